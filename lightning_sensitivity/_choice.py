"""Which way ``method="auto"`` goes for several targets: forward mode, about one tangent pass per target, or
per-sample reverse mode, about one backward pass per output element of a sample. Measured once per module and
:func:`signature` (``functional._Plan.choices``), on probes that cost about one forward-mode pass.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from lightning_sensitivity._kernels import forward_ad_kernels
from lightning_sensitivity._modes import Model, Result, forward, reverse
from lightning_sensitivity._per_sample import per_sample_reverse
from lightning_sensitivity._refusals import culprit, is_unsupported
from lightning_sensitivity._targets import ResolvedTarget

if TYPE_CHECKING:
    from lightning_sensitivity.functional import _Plan

_LOG = logging.getLogger("lightning_sensitivity")


def signature(model: Model, resolved: Sequence[ResolvedTarget]) -> tuple[Any, ...]:
    """What the choice of mode is kept for: the function, the targets and the inputs' structure (dimensions and
    dtypes, not sizes: batches of varying sequence length share one choice, measured once, so that every process
    of a distributed run measures at the same batch)."""
    leaves, _ = tree_flatten(model.inputs)
    shapes = tuple((x.dim(), x.dtype) if isinstance(x, Tensor) else type(x) for x in leaves)
    return model.name, tuple(t.label for t in resolved), shapes


def choose(model: Model, plan: _Plan, resolved: Sequence[ResolvedTarget], tensors: dict[str, Tensor]) -> str:
    """Forward mode costs about one tangent pass per target, per-sample reverse mode about one backward pass per
    output element of a sample: time forward mode on a few targets and every sample, and reverse mode on every
    target and a few samples, then extrapolate. Both probes must agree where they overlap, or forward mode (the
    one that detects lost derivatives) is kept."""
    k = min(len(resolved), 8)

    def probe_forward() -> tuple[dict[str, Tensor], list[ResolvedTarget], Tensor]:
        with forward_ad_kernels(plan.safe_kernels, rnn=plan.rnn):
            return forward(model, resolved[:k], tensors, None, plan.vectorise)

    probe: dict[str, Tensor] | None
    try:
        probe, _, output = probe_forward()  # the output's shape, and the warm-up of the timed run below
    except (NotImplementedError, RuntimeError) as error:
        if not is_unsupported(error):
            raise
        probe = None  # an op without a forward formula (or vmap rule) in this model
        output = model.plain()
    batch = output.shape[0]
    per_sample = max(1, output[0].numel()) if batch else 1
    if probe is not None and len(resolved) <= per_sample:
        # A backward pass costs at least a tangent pass: O of them per sample cannot beat K <= O tangent passes,
        # and the probe itself (O backward passes vectorised over samples) can take far more memory.
        _LOG.debug(
            "%s: forward mode for %d targets and output %s (no more targets than output elements per sample)",
            model.name,
            len(resolved),
            tuple(output.shape),
        )
        return "forward"
    forward_time = timed(probe_forward, model.device, warm_up=False)[1] if probe is not None else math.inf
    forward_cost = forward_time * len(resolved) / k
    try:
        # One sample first: a bound on the cost of every sample (vectorising only makes it cheaper); a closer
        # estimate from 64 samples only where the bound does not already rule reverse mode out, so that the
        # probes cost at most about one forward-mode pass.
        _, one_time = timed(
            lambda: per_sample_reverse(first_samples(model, batch, 1), resolved, tensors, None), model.device
        )
        if one_time * batch > 8 * forward_cost:
            _LOG.debug(
                "%s: forward mode for %d targets and output %s (estimated %.3g s forward, per-sample "
                "reverse above %.3g s)",
                model.name,
                len(resolved),
                tuple(output.shape),
                forward_cost,
                one_time * batch,
            )
            return "forward"
        samples = min(batch, 64)
        (reversed_, _, _), reverse_time = timed(
            lambda: per_sample_reverse(first_samples(model, batch, samples), resolved, tensors, None),
            model.device,
            warm_up=False,
        )
    except Exception as error:  # noqa: BLE001 - any refusal (vmap, a layer that needs a batch): forward mode
        plan.per_sample = False
        _LOG.debug("%s: forward mode (per-sample reverse mode refused: %s)", model.name, culprit(error))
        return "forward"
    reverse_cost = reverse_time * batch / samples
    if probe is not None:
        agree = all(close(reversed_[t.label], probe[t.label][:samples]) for t in resolved[:k])
    else:  # no forward-mode probe to compare with: batched reverse mode on the first samples
        agree = per_sample_agrees(model, resolved, tensors)
    choice = "per-sample reverse" if agree and reverse_cost < forward_cost else "forward"
    _LOG.debug(
        "%s: %s for %d targets and output %s (estimated %.3g s forward, %.3g s per-sample reverse%s)",
        model.name,
        choice,
        len(resolved),
        tuple(output.shape),
        forward_cost,
        reverse_cost,
        "" if agree else "; the two modes disagree on the probe",
    )
    return choice


def timed(fn: Callable[[], Result], device: torch.device, warm_up: bool = True) -> tuple[Result, float]:
    """``fn()`` and the seconds it took (run twice with ``warm_up``: the first run is not timed)."""
    if warm_up:
        fn()
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def synchronize(device: torch.device) -> None:
    accelerator = getattr(torch, device.type, None) if device.type != "cpu" else None
    if accelerator is not None and hasattr(accelerator, "synchronize"):
        accelerator.synchronize()


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
    sub = Model(model.module, args, kwargs, None, model.runner.api, running_stats=model.running_stats)
    sub.runner, sub.name = model.runner, model.name  # the same function (sensitivity_step) and output checks
    return sub
