"""Which way ``method="auto"`` goes for several targets: forward mode, about one tangent pass per target, or
per-sample reverse mode, about one backward pass per output element of a sample. Measured once per module and
:func:`signature` (``Plan.choices``), on probes that cost about one forward-mode pass, timed by the
:class:`~lightning_sensitivity._plans.Plans`' timer (wall-clock time, or one a test hands in).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from lightning_sensitivity._kernels import forward_ad_kernels
from lightning_sensitivity._model import Model, Result
from lightning_sensitivity._modes import forward, reverse
from lightning_sensitivity._per_sample import per_sample_reverse
from lightning_sensitivity._plans import Timer
from lightning_sensitivity._refusals import culprit, is_unsupported
from lightning_sensitivity._targets import ResolvedTarget

_LOG = logging.getLogger("lightning_sensitivity")

#: Targets the forward-mode probe pushes (its time is scaled to all of them).
_PROBED_TARGETS = 8
#: Samples the second per-sample reverse probe differentiates (its time is scaled to the batch).
_PROBED_SAMPLES = 64


def signature(model: Model, resolved: Sequence[ResolvedTarget]) -> tuple[Any, ...]:
    """What the choice of mode is kept for: the function, the targets and the inputs' structure (dimensions and
    dtypes, not sizes: batches of varying sequence length share one choice, measured once, so that every process
    of a distributed run measures at the same batch)."""
    leaves, _ = tree_flatten(model.inputs)
    shapes = tuple((x.dim(), x.dtype) if isinstance(x, Tensor) else type(x) for x in leaves)
    return model.name, tuple(t.label for t in resolved), shapes


def choose(model: Model, resolved: Sequence[ResolvedTarget], tensors: dict[str, Tensor], timer: Timer) -> str:
    """``"forward"`` or ``"per-sample reverse"``, whichever the probes find cheaper: forward mode on a few targets
    and every sample, reverse mode on every target and a few samples, extrapolated. Both must agree where they
    overlap, or forward mode (the one that detects lost derivatives) is kept."""
    plan = model.plan
    k = min(len(resolved), _PROBED_TARGETS)

    def probe_forward() -> Result:
        with forward_ad_kernels(plan.safe_kernels, rnn=plan.rnn):
            return forward(model, resolved[:k], tensors, None, plan.vectorise)

    probe: dict[str, Tensor] | None
    try:
        probe, _, output = probe_forward()  # the output's shape, and the warm-up of the timed run below
    except (NotImplementedError, RuntimeError) as error:
        if not is_unsupported(error):
            raise
        probe, output = None, model.plain()  # an op without a forward formula (or vmap rule) in this model
    batch = output.shape[0]
    per_sample = max(1, output[0].numel()) if batch else 1
    if probe is not None and len(resolved) <= per_sample:
        # A backward pass costs at least a tangent pass: O of them per sample cannot beat K <= O tangent passes,
        # and the probe itself (O backward passes vectorised over samples) can take far more memory.
        return _chose(model, "forward", resolved, output, "no more targets than output elements per sample")
    forward_cost = timer("forward", probe_forward)[1] * len(resolved) / k if probe is not None else math.inf
    try:
        # One sample first: a bound on the cost of every sample (vectorising only makes it cheaper); a closer
        # estimate from 64 samples only where the bound does not already rule reverse mode out, so that the
        # probes cost at most about one forward-mode pass.
        one = first_samples(model, batch, 1)
        _, one_time = timer("per-sample reverse, one sample", lambda: per_sample_reverse(one, resolved, tensors, None))
        if one_time * batch > 8 * forward_cost:
            why = f"estimated {forward_cost:.3g} s forward, per-sample reverse above {one_time * batch:.3g} s"
            return _chose(model, "forward", resolved, output, why)
        samples = min(batch, _PROBED_SAMPLES)
        some = first_samples(model, batch, samples)
        (reversed_, _, _), reverse_time = timer(
            "per-sample reverse", lambda: per_sample_reverse(some, resolved, tensors, None)
        )
    except Exception as error:  # noqa: BLE001 - any refusal (vmap, a layer that needs a batch): forward mode
        plan.per_sample = False
        return _chose(model, "forward", resolved, output, f"per-sample reverse mode refused: {culprit(error)}")
    reverse_cost = reverse_time * batch / samples
    if probe is not None:
        agree = all(close(reversed_[t.label], probe[t.label][:samples]) for t in resolved[:k])
    else:  # no forward-mode probe to compare with: batched reverse mode on the first samples
        agree = per_sample_agrees(model, resolved, tensors)
    choice = "per-sample reverse" if agree and reverse_cost < forward_cost else "forward"
    why = f"estimated {forward_cost:.3g} s forward, {reverse_cost:.3g} s per-sample reverse"
    return _chose(model, choice, resolved, output, why if agree else f"{why}; the two modes disagree on the probe")


def _chose(model: Model, choice: str, resolved: Sequence[ResolvedTarget], output: Tensor, why: str) -> str:
    _LOG.debug("%s: %s for %d targets and output %s (%s)", model.name, choice, len(resolved), tuple(output.shape), why)
    return choice


def close(a: Tensor, b: Tensor) -> bool:
    scale = float(b.abs().nan_to_num(0, 0, 0).amax()) if b.numel() else 1.0
    return torch.allclose(a, b, rtol=1e-3, atol=1e-5 * scale, equal_nan=True)


def per_sample_agrees(model: Model, resolved: Sequence[ResolvedTarget], tensors: dict[str, Tensor]) -> bool:
    """Per-sample reverse mode against batched reverse mode on the first two samples: ``vmap`` over a backward
    pass is only as right as the batching rules of the ops' backward formulas (``torch.cdist``'s is wrong)."""
    batch = model.plain().shape[0]
    sub = first_samples(model, batch, min(batch, 2))
    per_sample, _, _ = per_sample_reverse(sub, resolved, tensors, None)
    batched, _, _ = reverse(sub, resolved, tensors, None)
    return all(close(per_sample[t.label], batched[t.label]) for t in resolved)


def first_samples(model: Model, batch: int, samples: int) -> Model:
    """``model`` on the first ``samples`` samples of its inputs (every tensor whose first dimension is ``batch``)."""

    def cut(x: Any) -> Any:
        return x[:samples] if isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] == batch else x

    leaves, spec = tree_flatten(model.inputs)  # views: the model made here copies them where it must
    args, kwargs = tree_unflatten([cut(x) for x in leaves], spec)
    return model.on(args, kwargs)
