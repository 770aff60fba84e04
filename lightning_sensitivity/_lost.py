"""Never a silent zero: which derivatives that came out of AD as zeros are zeros.

A mode marks a target *missing* when no tangent (or gradient) reached the output at all; a lost derivative can
also come out as zeros that nothing marks (a chunk of targets under ``vmap``, reverse mode). Every all-zero
derivative is confirmed until the mode has given that target a nonzero one on the call's signature: forward mode
on the target alone tells a zero AD carries (a dead ReLU unit, a kink, a rounding step) from a lost one; what is
left goes to central finite differences, and where the output does not move, a NaN probe tells independence
(never checked again) from a flat spot (checked at the next call).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_sensitivity._kernels import forward_ad_kernels
from lightning_sensitivity._model import Model, RandomState
from lightning_sensitivity._modes import forward
from lightning_sensitivity._refusals import culprit
from lightning_sensitivity._targets import ResolvedTarget
from lightning_sensitivity._verify import _LIKELY_CAUSES, FiniteDifferences, SensitivityCheckError

_LOG = logging.getLogger("lightning_sensitivity")

#: A target whose derivative AD lost, with the central differences along it (``None``: seen on another process).
Lost = tuple[ResolvedTarget, Tensor | None]


class Losses:
    """What becomes of targets whose derivative AD lost while the output moves with them: without ``on_lost``, a
    :class:`~lightning_sensitivity.SensitivityCheckError`; with it, NaN for those targets, and
    ``on_lost(error, labels)`` is told instead."""

    def __init__(self, on_lost: Callable[[SensitivityCheckError, list[str]], None] | None) -> None:
        self.on_lost = on_lost
        self.labels: set[str] = set()

    def give_up(self, message: str, targets: Sequence[ResolvedTarget]) -> None:
        error = SensitivityCheckError(message)
        if self.on_lost is None:
            raise error
        labels = [t.label for t in targets]
        self.on_lost(error, labels)
        self.labels.update(labels)

    def apply(self, sens: dict[str, Tensor]) -> None:
        """NaN for every target given up on."""
        for label in self.labels:
            sens[label] = torch.full_like(sens[label], math.nan)


class Zeros:
    """Confirms the all-zero derivatives of one call of the engine, under the call's random state ``rng`` (the
    dropout masks of the AD evaluation)."""

    def __init__(
        self,
        model: Model,
        resolved: Sequence[ResolvedTarget],
        tensors: dict[str, Tensor],
        rng: RandomState,
        key: tuple[Any, ...],
        chunk_size: int | None,
        losses: Losses,
    ) -> None:
        self.model, self.plan, self.resolved, self.tensors = model, model.plan, resolved, tensors
        self.rng, self.key, self.chunk_size, self.losses = rng, key, chunk_size, losses

    def lost(self, sens: dict[str, Tensor], missing: Sequence[ResolvedTarget], mode: str) -> list[Lost]:
        """The targets whose derivative ``mode`` lost: those no tangent reached (``missing``), and those whose
        derivative is zero everywhere while ``mode`` has not yet given them a nonzero one on this signature and
        forward mode on the target alone does not carry the zero itself, that the output moves with."""
        candidates = list(missing)
        carried = self.plan.carried.setdefault((self.key, mode), set())
        known = carried | {t.label for t in missing} | self.plan.independent
        pending = [t for t in self.resolved if t.label not in known]
        if pending and next(iter(sens.values())).numel() > 0:
            moved = torch.stack([sens[t.label].ne(0).any() for t in pending]).tolist()  # one sync while any is open
            for target, nonzero in zip(pending, moved, strict=True):
                # alone: dual numbers on one target already told a missing tangent from a zero
                if nonzero or self._alone(mode) or self._carries_zero(target):
                    carried.add(target.label)
                else:
                    candidates.append(target)
        return self._moving(candidates, sens)

    def _alone(self, mode: str) -> bool:
        one_at_a_time = len(self.resolved) == 1 or not self.plan.vectorise or self.chunk_size == 1
        return mode == "forward" and one_at_a_time

    def _carries_zero(self, target: ResolvedTarget) -> bool:
        """Whether forward mode on ``target`` alone carries a tangent to the output that is zero everywhere: a zero
        that AD computed, not one it lost. ``True`` too where forward mode cannot run the model (nothing to tell
        by); ``False`` where no tangent reaches the output or forward mode finds a nonzero derivative."""
        try:
            with self.rng.replayed(), forward_ad_kernels(self.plan.safe_kernels, rnn=self.plan.rnn):
                sens, missing, _ = forward(self.model, [target], self.tensors, None, True)
        except Exception as error:  # noqa: BLE001 - an op without a forward formula: reverse mode's zero stands
            _LOG.debug("%s: forward mode refused to confirm a zero derivative (%s)", self.model.name, culprit(error))
            return True
        return not missing and not bool(sens[target.label].ne(0).any())

    def _moving(self, candidates: list[ResolvedTarget], sens: dict[str, Tensor]) -> list[Lost]:
        """The ``candidates`` the output moves with, by central finite differences, with those differences. Of the
        others, those whose value reaches no output element (a NaN probe) are remembered as independent; the rest
        (the output is flat along them here, as ``x * k.item()`` is at ``x = 0``) are checked at the next call. A
        target that reaches the output only through a reference of the model's own is given up on."""
        todo = [t for t in candidates if t.label not in self.plan.independent]
        if not todo or next(iter(sens.values())).numel() == 0:  # an empty output tells nothing
            return []
        differences = FiniteDifferences(self.model, self.tensors, self.rng)
        lost: list[Lost] = []
        for target in todo:
            moved = differences.depends(target, sens[target.label].dtype)
            if moved is not None:
                lost.append((target, moved))
            elif differences.reaches(target):
                continue
            elif differences.reaches_past_the_module(target):
                self.losses.give_up(past_the_module(self.model, target), [target])
            else:  # independent whatever the inputs: never checked again
                self.plan.independent.add(target.label)
        return lost


def past_the_module(model: Model, target: ResolvedTarget) -> str:
    return (
        f"{model.api}: the output of {model.name} depends on {target.label!r} through a reference of its own (a "
        "functools.partial or a list holding the parameter, a view taken in __init__), not through the module's "
        f"attribute {target.name!r}: the engine gives the derivative to the attribute, so it would have been reported "
        "as zero. Read the tensor from the module inside forward (for example F.linear(x, self.layer.weight))."
    )


def lost_message(model: Model, lost: Sequence[Lost], mode: str, hint: str) -> str:
    """The error for derivatives ``mode`` lost, with the size of the finite differences the output moved by."""
    # ``fd`` is None on a process whose own differences did not move: a sharded model's targets that any process
    # saw move are listed on every process, so that they raise together
    listed = ", ".join(
        f"{t.label!r} (central differences of norm {float(torch.linalg.vector_norm(fd)):.3g})"
        if fd is not None
        else f"{t.label!r} (on another process)"
        for t, fd in lost
    )
    return (
        f"{model.api}: the output of {model.name} moves with {listed}, but no derivative along it reached the "
        f"output in {mode}; it would have been reported as zero. {_LIKELY_CAUSES} {hint}".rstrip()
        + " "
    )


def targets_of(lost: Sequence[Lost]) -> list[ResolvedTarget]:
    return [target for target, _ in lost]
