"""Every check of a public argument, in one place: short messages that name the argument, what was given and
what is allowed. ``api`` is the prefix of the message (``"per_sample_sensitivities"``,
``"SensitivityMonitor(method=...)"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

METHODS = ("auto", "forward", "reverse")
NORMALIZATIONS = ("none", "parameter", "relative")
REDUCTIONS = ("none", "sum", "mean", "norm")
STAGES = ("validate", "test", "predict")


def one_of(value: Any, choices: Sequence[str], api: str, name: str | None = None) -> None:
    """A ``ValueError`` unless ``value`` is one of ``choices``.

    Example:
        >>> one_of("sideways", METHODS, "per_sample_sensitivities", "method")
        Traceback (most recent call last):
        ...
        ValueError: per_sample_sensitivities: method must be one of 'auto', 'forward', 'reverse'; got 'sideways'.
    """
    if value not in choices:
        what = "must" if name is None else f"{name} must"
        raise ValueError(f"{api}: {what} be one of {', '.join(map(repr, choices))}; got {value!r}.")


def positive(value: Any, api: str, name: str | None = None, optional: bool = False) -> None:
    """A ``ValueError`` unless ``value`` is a positive integer (or ``None`` where ``optional``)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        what = "must" if name is None else f"{name} must"
        kind = "a positive integer or None" if optional else "a positive integer"
        raise ValueError(f"{api}: {what} be {kind}; got {value!r}.")


def verify_value(value: Any, api: str) -> None:
    if not any(value is v for v in (True, False)) and value not in ("error", "warn"):
        raise ValueError(f"{api}: must be True, False, 'error' or 'warn'; got {value!r}.")


def stage_list(stages: str | Sequence[str], api: str) -> list[str]:
    """``stages`` as a list of distinct stages (one string is a list of one)."""
    listed = [stages] if isinstance(stages, str) else list(stages)
    if not listed or not all(stage in STAGES for stage in listed) or len(set(listed)) != len(listed):
        raise ValueError(f"{api}: must be distinct values among {', '.join(map(repr, STAGES))}; got {stages!r}.")
    return listed


def tag_prefix(prefix: Any, api: str) -> None:
    if not isinstance(prefix, str) or not prefix.strip("/") or prefix != prefix.strip("/ "):
        raise ValueError(
            f"{api}: must be a non-empty tag without leading or trailing '/' or spaces, such as 'sensitivity'; "
            f"got {prefix!r}."
        )


def indices(value: Any, api: str) -> None:
    if value is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
        raise ValueError(f"{api}: must be a list of non-negative indices; got {value!r}.")
