"""Every check of a public argument, in one place: short messages that name the argument, what was given and
what is allowed. ``api`` is the prefix of the message (``"per_sample_sensitivities"``,
``"SensitivityMonitor(method=...)"``).
"""

from __future__ import annotations

import importlib
import inspect
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


def step_function(value: Any, api: str) -> Any:
    """``value`` as a callable ``step(pl_module, batch, batch_idx[, dataloader_idx])``: a callable, or the import
    path of one (``"my_package.steps.energy"``, as LightningCLI also resolves it); ``None`` stays ``None``.

    Example:
        >>> step_function("math.hypot", "SensitivityMonitor(step=...)").__name__
        'hypot'
        >>> step_function("math.nowhere", "SensitivityMonitor(step=...)")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: SensitivityMonitor(step=...): cannot import 'math.nowhere' (module 'math' has no attribute ...
    """
    if value is None:
        return None
    if isinstance(value, str):
        module_name, _, attribute = value.strip().rpartition(".")
        try:
            if not module_name:
                raise ValueError("not a dotted path")
            value = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError, ValueError) as error:
            raise ValueError(
                f"{api}: cannot import {value!r} ({error}); give a callable or the import path of one, such as "
                "'my_package.steps.energy'."
            ) from None
    if not callable(value):
        raise ValueError(
            f"{api}: must be a callable step(pl_module, batch, batch_idx) that returns the output to differentiate, "
            f"or its import path; got {type(value).__name__}."
        )
    try:
        signature = inspect.signature(value)
    except (TypeError, ValueError):  # a builtin without a signature: let the call tell
        return value
    try:
        try:
            signature.bind(None, None, None)
        except TypeError:
            signature.bind(None, None, None, None)  # with dataloader_idx
    except TypeError as error:
        raise ValueError(
            f"{api}: {import_path(value)}{signature} cannot be called as step(pl_module, batch, batch_idx) ({error}); "
            "it may also take dataloader_idx as a fourth parameter."
        ) from None
    return value


def import_path(value: Any) -> str | None:
    """``"package.module.function"`` for a callable (its class's for other callables); ``None`` stays ``None``.

    Example:
        >>> import math
        >>> import_path(math.hypot), import_path(None)
        ('math.hypot', None)
    """
    if value is None:
        return None
    named = value if hasattr(value, "__qualname__") else type(value)
    return f"{getattr(named, '__module__', None) or ''}.{named.__qualname__}".lstrip(".")
