"""Per-sample sensitivities of a module's output to named scalars, by forward-mode AD.

This module knows nothing about Lightning. Shapes, with ``B`` samples and ``K`` targets::

    args -> module -> y [B, *out]
    per_sample_sensitivities(...)[target] [B, *out] = d y / d target

Forward mode pushes one tangent per target through the module: dual numbers for one target, and
``torch.func.vmap`` over ``torch.func.jvp`` with one-hot tangents for several, ``chunk_size`` at a time, for
about ``1 + K`` forward passes in all. Where an op has no forward-mode formula, ``method="auto"`` falls back
to reverse mode, batched over chunks of output elements. This file decides which way to go and remembers it
per module; ``_modes.py`` holds the ways.
"""

from __future__ import annotations

import linecache
import logging
import math
import os
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

import lightning_sensitivity
from lightning_sensitivity._kernels import forward_ad_kernels, has_rnn, running_statistics
from lightning_sensitivity._modes import Model, RandomState, Result, forward, reverse
from lightning_sensitivity._per_sample import NotPerSample, per_sample_reverse
from lightning_sensitivity._sharded import (
    SensitivityShardingError,
    ShardedFiniteDifferences,
    ShardedModel,
    uses_fsdp,
)
from lightning_sensitivity._targets import ResolvedTarget, resolve_targets, target_tensors
from lightning_sensitivity._verify import (
    _LIKELY_CAUSES,
    FiniteDifferences,
    Mismatch,
    SensitivityCheckError,
    mismatch_message,
)

Method = Literal["auto", "forward", "reverse"]
METHODS: tuple[str, ...] = ("auto", "forward", "reverse")
Normalize = Literal["none", "parameter", "relative"]
NORMALIZATIONS: tuple[str, ...] = ("none", "parameter", "relative")

# Messages of errors that mean "this op or function has no forward-mode (or vmap) rule".
_UNSUPPORTED_MARKERS = (
    "forward ad",
    "forward-mode",
    "forward mode",
    "setup_context",
    "jvp",
    "batching rule",
    "vmap",
    "functorch",
)


_LOG = logging.getLogger("lightning_sensitivity")

#: Code of these packages is never "the line of the model that called the op" in messages.
_LIBRARY_ROOTS = tuple(os.path.dirname(p.__file__ or "") + os.sep for p in (torch, lightning_sensitivity))


@dataclass
class _Plan:
    """What worked for a module, remembered across calls so that failed attempts are paid once."""

    rnn: bool = False
    safe_kernels: bool = False
    vectorise: bool = True
    reverse: bool = False
    #: labels of targets whose missing derivative finite differences confirmed (the output does not move)
    independent: set[str] = field(default_factory=set)
    #: whether per-sample reverse mode may work (False once the model mixed samples or refused vmap)
    per_sample: bool = True
    #: the mode measured cheaper per signature (targets, input shapes): "forward" or "per-sample reverse"
    choices: dict[tuple[Any, ...], str] = field(default_factory=dict)
    #: signatures on which per-sample reverse mode was checked against the batched output and batched reverse mode
    per_sample_checked: set[tuple[Any, ...]] = field(default_factory=set)


_PLANS: weakref.WeakKeyDictionary[nn.Module, _Plan] = weakref.WeakKeyDictionary()


def per_sample_sensitivities(
    module: nn.Module,
    targets: str | Sequence[str],
    args: Tensor | tuple[Any, ...],
    kwargs: dict[str, Any] | None = None,
    *,
    method: Method = "auto",
    chunk_size: int | None = None,
    verify: bool = False,
    normalize: Normalize = "none",
) -> dict[str, Tensor]:
    """Derivative of every output element of ``module(*args, **kwargs)`` with respect to each target.

    ``# args -> y [B, *out];  result[target] [B, *out] = d y / d target``

    Runs in the caller's grad mode, including ``torch.no_grad()`` and ``torch.inference_mode()``, and never
    changes the module: its parameters, buffers, ``requires_grad`` flags and ``.grad`` stay as they were.

    Args:
        module: the model. It is evaluated as it is (call ``module.eval()`` first for validation behaviour).
        targets: one target or a list. Each is the name of a parameter or buffer holding one element
            (``"C"``), one element of a tensor (``"net.0.weight[3, -1]"``), or a glob over names
            (``"blocks.*.alpha"``) that expands in module order.
        args: positional arguments of the forward call, a tuple (a single tensor is taken as ``(x,)``).
        kwargs: keyword arguments of the forward call.
        method: ``"forward"`` (forward-mode AD: about one tangent pass per target), ``"reverse"`` (reverse mode
            per sample, vectorised over samples: about one backward pass per output element of a sample,
            whatever the number of targets; batched over output elements for a model that mixes samples), or
            ``"auto"``: forward mode, except where, for several targets, a measurement on the first call (once
            per module, targets and input shape; logged at debug level by the ``lightning_sensitivity`` logger)
            finds per-sample reverse mode cheaper; and reverse mode, with one warning per module, where an op
            has no forward-mode formula. A model sharded with FSDP2 is differentiated in forward mode.
        chunk_size: how many tangents (forward mode), samples (per-sample reverse mode) or output elements
            (batched reverse mode) are pushed through at once; memory grows with it. ``None``: all targets at
            once in forward mode, as many samples as keep about 2^25 gradient elements in per-sample reverse
            mode, and a block of at most 256 output elements in batched reverse mode.
        verify: also compare the result with central finite differences (about two more forward passes per
            target) and raise :class:`~lightning_sensitivity.SensitivityCheckError` where they disagree.
        normalize: ``"none"``: ``dy/dθ``; ``"parameter"``: ``θ · dy/dθ`` (the scaled sensitivity, in the units
            of ``y``); ``"relative"``: ``(θ / y) · dy/dθ`` (the elasticity: the relative change of ``y`` per
            relative change of ``θ``; non-finite where ``y`` is 0).

    Returns:
        A dict from each target's canonical label (``name`` or ``name[i, j]``, negative indices made
        positive), in the order given, to a detached tensor shaped, placed and typed like the output.

    Raises:
        TypeError: the output is not a floating-point tensor, or a target is not floating point.
        ValueError: a bad target, ``method`` or ``chunk_size``; an output without a sample dimension.
        IndexError: a target's index is out of range or of the wrong rank.
        SensitivityCheckError: with ``verify``, AD and finite differences disagree; always, when the output
            moves with a target whose derivative no AD mode carries (it would otherwise be reported as zero).

    Example:
        The seed problem, ``y = C * x``, whose derivative with respect to ``C`` is ``x``:

        >>> import torch
        >>> from torch import nn
        >>> class Scale(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.C = nn.Parameter(torch.tensor(-5.0))
        ...     def forward(self, x):
        ...         return self.C * x
        >>> x = torch.arange(10.0)
        >>> sens = per_sample_sensitivities(Scale(), "C", (x,))
        >>> sens["C"]
        tensor([0., 1., 2., 3., 4., 5., 6., 7., 8., 9.])
        >>> torch.equal(sens["C"], x)
        True

        One element of a weight matrix, under ``torch.inference_mode()`` as in Lightning's validation:

        >>> net = nn.Sequential(nn.Linear(3, 2), nn.Tanh())
        >>> with torch.inference_mode():
        ...     out = per_sample_sensitivities(net, ["0.weight[1, -1]", "0.bias[1]"], torch.ones(4, 3))
        >>> list(out), out["0.weight[1, 2]"].shape
        (['0.weight[1, 2]', '0.bias[1]'], torch.Size([4, 2]))
    """
    api = "per_sample_sensitivities"
    check_method(method, api)
    check_chunk_size(chunk_size, api)
    check_normalize(normalize, api)
    resolved = resolve_targets(module, targets, api)
    on_check = _raise_on_mismatch(api) if verify else None
    sens, _ = sensitivities_and_output(
        module,
        resolved,
        args,
        kwargs,
        method=method,
        chunk_size=chunk_size,
        api=api,
        on_check=on_check,
        normalize=normalize,
    )
    return sens


def _raise_on_mismatch(api: str) -> Callable[[list[Mismatch]], None]:
    def on_check(mismatches: list[Mismatch]) -> None:
        if mismatches:
            hint = "Fix the model, or leave verify=False to accept these values."
            raise SensitivityCheckError(mismatch_message(api, mismatches, "on this batch", hint), mismatches)

    return on_check


def check_method(method: str, api: str) -> None:
    """Raise a ``ValueError`` naming ``method`` unless it is one of :data:`METHODS`."""
    if method not in METHODS:
        raise ValueError(f"{api}: method must be one of {', '.join(map(repr, METHODS))}; got {method!r}.")


def check_normalize(normalize: str, api: str) -> None:
    """Raise a ``ValueError`` naming ``normalize`` unless it is one of :data:`NORMALIZATIONS`."""
    if normalize not in NORMALIZATIONS:
        choices = ", ".join(map(repr, NORMALIZATIONS))
        raise ValueError(f"{api}: normalize must be one of {choices}; got {normalize!r}.")


def check_chunk_size(chunk_size: int | None, api: str) -> None:
    """Raise a ``ValueError`` naming ``chunk_size`` unless it is ``None`` or a positive integer."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{api}: chunk_size must be a positive integer or None; got {chunk_size!r}.")


def sensitivities_and_output(
    module: nn.Module,
    resolved: Sequence[ResolvedTarget],
    args: Tensor | tuple[Any, ...],
    kwargs: dict[str, Any] | None = None,
    *,
    method: Method = "auto",
    chunk_size: int | None = None,
    function: Callable[..., Any] | None = None,
    api: str = "per_sample_sensitivities",
    on_check: Callable[[list[Mismatch]], None] | None = None,
    normalize: Normalize = "none",
    agree: Callable[[str], str] | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """:func:`per_sample_sensitivities` for targets resolved beforehand (the callback resolves them once).

    With ``function`` (a method of ``module`` such as ``sensitivity_step``), ``function(*args, **kwargs)`` is
    differentiated instead of ``module(*args, **kwargs)``, with the module's tensors swapped in the same way.
    With ``on_check``, the result is also compared with finite differences and ``on_check`` receives the
    targets that disagree (an empty list when all agree); the check sees the derivatives before ``normalize``.
    With ``agree``, the mode ``"auto"`` measured cheaper is passed through it, and its answer is used: the callback
    makes every process of a distributed run use rank 0's choice.
    Returns the sensitivities and the output of the evaluation they came from (detached): the callback hands that
    output to a ``validation_step`` that asked for it (``_fused.py``).
    """
    if isinstance(args, Tensor):
        args = (args,)
    elif not isinstance(args, tuple):
        args = tuple(args)
    kwargs = {} if kwargs is None else kwargs
    plan = _PLANS.setdefault(module, _Plan(rnn=has_rnn(module)))
    model = Model(module, args, kwargs, function, api, running_stats=running_statistics(module, resolved, api))
    tensors = target_tensors(module, resolved)
    if uses_fsdp(module):
        with ShardedModel(model, resolved, tensors) as sharded:
            sens, output = _differentiate_sharded(sharded, plan, method, chunk_size, api, on_check)
            values = sharded.values() if normalize != "none" else {}
    else:
        checker = FiniteDifferences(model, tensors) if on_check is not None else None  # before the model runs
        sens, output = _differentiate(model, plan, resolved, tensors, method, chunk_size, api, agree)
        if checker is not None and on_check is not None:
            on_check([m for t in resolved if (m := checker.check(t, sens[t.label])) is not None])
        values = {t.label: tensors[t.name].detach()[t.index] for t in resolved}  # on the device: no host sync
    if normalize == "none":
        return sens, output
    scaled = {}
    for target in resolved:
        theta = values[target.label].to(output.dtype)
        factor = theta if normalize == "parameter" else theta / output
        scaled[target.label] = factor * sens[target.label]
    return scaled, output


def choice_pending(
    module: nn.Module,
    resolved: Sequence[ResolvedTarget],
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None = None,
    *,
    method: Method = "auto",
    function: Callable[..., Any] | None = None,
) -> bool:
    """Whether :func:`sensitivities_and_output` on these arguments would first measure which mode is cheaper
    (``method="auto"``, several targets, a new input structure), which with ``agree`` is a collective."""
    plan = _PLANS.get(module)
    if plan is None:
        return True
    if not _chooses(plan, method, resolved):
        return False
    return _signature(Model(module, args, kwargs or {}, function), resolved) not in plan.choices


def _chooses(plan: _Plan, method: Method, resolved: Sequence[ResolvedTarget]) -> bool:
    """Whether ``method="auto"`` chooses between forward and per-sample reverse mode for these targets."""
    return method == "auto" and not plan.reverse and len(resolved) > 1 and plan.per_sample


def _differentiate_sharded(
    sharded: ShardedModel,
    plan: _Plan,
    method: Method,
    chunk_size: int | None,
    api: str,
    on_check: Callable[[list[Mismatch]], None] | None,
) -> tuple[dict[str, Tensor], Tensor]:
    """Forward mode for a model sharded with FSDP2: the tangents are given inside the forward of each target's
    managing module (``_sharded.py``). Every process runs the same evaluations (each is a collective)."""
    model = sharded.model
    if method == "reverse":
        raise ValueError(
            f"{api}: method='reverse' is not available for a model sharded with FSDP (fully_shard); use "
            "method='forward' or 'auto'."
        )
    checker = ShardedFiniteDifferences(sharded) if on_check is not None else None  # before the model runs
    while True:
        try:
            sens, missing, output = sharded.forward(chunk_size, plan.vectorise)
            break
        except (NotImplementedError, RuntimeError) as error:
            if not _is_unsupported(error) or isinstance(error, SensitivityShardingError):
                raise
            if plan.vectorise and len(sharded.resolved) > 1:
                plan.vectorise = False
                continue
            raise RuntimeError(
                f"{api}: forward-mode AD is not available for an op in {model.name}: {_culprit(error)}. Reverse "
                "mode, the usual fallback, is not available for a model sharded with FSDP."
            ) from error
    todo = [t for t in missing if t.label not in plan.independent]
    if todo:
        differences = ShardedFiniteDifferences(sharded)
        moved = {t.label: differences.depends(t, sens[t.label].dtype) for t in todo}
        # every process must take the same way on: each evaluation of a sharded model is a collective
        lost = [(t, moved[t.label]) for t in todo if _any_process(moved[t.label] is not None, output.device)]
        if lost:
            raise SensitivityCheckError(_lost_message(api, model, lost, "forward-mode AD", ""))
        plan.independent.update(t.label for t in todo)
    if checker is not None and on_check is not None:
        on_check([m for t in sharded.resolved if (m := checker.check(t, sens[t.label])) is not None])
    return sens, output


def _any_process(flag: bool, device: torch.device) -> bool:
    """``flag`` or-ed over every process of the default group (just ``flag`` without one)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor(float(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def _differentiate(
    model: Model,
    plan: _Plan,
    resolved: Sequence[ResolvedTarget],
    tensors: dict[str, Tensor],
    method: Method,
    chunk_size: int | None,
    api: str,
    agree: Callable[[str], str] | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """Forward mode with its fallbacks, or per-sample reverse mode where ``"auto"`` measured it cheaper (many
    targets, few output elements), then batched reverse mode where forward mode cannot go; zeros where a
    derivative never reached the output only once finite differences confirm that the output does not move.
    Returns the sensitivities and the output. Every attempt starts from the random state of the call, so the
    result sees the dropout masks of one evaluation (those finite differences see), whatever was tried before."""
    rng = RandomState(model.device)
    if _chooses(plan, method, resolved):
        key = _signature(model, resolved)
        if key not in plan.choices:
            choice = _choose(model, plan, resolved, tensors, chunk_size)
            plan.choices[key] = choice if agree is None else agree(choice)
            rng.restore()
        if plan.choices[key] == "per-sample reverse":
            sens, _, output = per_sample_reverse(model, resolved, tensors, chunk_size, check=False)
            return sens, output
    if method != "reverse" and not plan.reverse:
        result = _forward(model, plan, resolved, tensors, method, chunk_size, api)
        if result is not None:
            sens, missing, output = result
            lost = _lost(model, plan, tensors, missing, sens)
            if not lost:
                return sens, output
            if method == "forward":
                raise SensitivityCheckError(_lost_message(api, model, lost, "forward-mode AD", "Use method='auto'."))
            plan.reverse = True
            warnings.warn(
                f"{api}: {_lost_message(api, model, lost, 'forward-mode AD', '')[len(api) + 2 :]}"
                "Falling back to batched reverse mode, which costs a backward pass per chunk of output elements; "
                "pass method='reverse' to skip the forward attempt.",
                UserWarning,
                stacklevel=4,
            )
    if method == "reverse" and plan.per_sample:
        try:  # separable models: one backward pass per output element of a sample, vectorised over samples
            key = _signature(model, resolved)
            check = key not in plan.per_sample_checked and plan.choices.get(key) != "per-sample reverse"
            if check and not _per_sample_agrees(model, resolved, tensors):
                raise NotPerSample("per-sample reverse mode disagrees with batched reverse mode on the first samples")
            rng.restore()
            sens, _, output = per_sample_reverse(model, resolved, tensors, chunk_size, check=check)
            plan.per_sample_checked.add(key)  # auto's choice (plan.choices) is its own: method="reverse" leaves it
            return sens, output
        except Exception as error:  # noqa: BLE001 - any refusal (vmap, a layer that needs a batch): batched reverse
            plan.per_sample = False
            _LOG.debug("%s: per-sample reverse mode refused (%s); batched reverse mode", model.name, _culprit(error))
    rng.restore()
    sens, missing, output = reverse(model, resolved, tensors, chunk_size)
    lost = _lost(model, plan, tensors, missing, sens)
    if lost:
        raise SensitivityCheckError(_lost_message(api, model, lost, "either AD mode", ""))
    return sens, output


def _signature(model: Model, resolved: Sequence[ResolvedTarget]) -> tuple[Any, ...]:
    """What the choice of mode is kept for: the function, the targets and the inputs' structure (dimensions and
    dtypes, not sizes: batches of varying sequence length share one choice, measured once, so that every process
    of a distributed run measures at the same batch)."""
    leaves, _ = tree_flatten((model.args, model.kwargs))
    shapes = tuple((x.dim(), x.dtype) if isinstance(x, Tensor) else type(x) for x in leaves)
    return model.name, tuple(t.label for t in resolved), shapes


def _choose(
    model: Model, plan: _Plan, resolved: Sequence[ResolvedTarget], tensors: dict[str, Tensor], chunk_size: int | None
) -> str:
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
        if not _is_unsupported(error):
            raise
        probe = None  # an op without a forward formula (or vmap rule) in this model
        with torch.no_grad():
            output = model({})
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
    forward_time = _timed(probe_forward, model.device, warm_up=False)[1] if probe is not None else math.inf
    forward_cost = forward_time * len(resolved) / k
    try:
        # One sample first: a bound on the cost of every sample (vectorising only makes it cheaper); a closer
        # estimate from 64 samples only where the bound does not already rule reverse mode out, so that the
        # probes cost at most about one forward-mode pass.
        _, one_time = _timed(
            lambda: per_sample_reverse(_first_samples(model, batch, 1), resolved, tensors, None), model.device
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
        (reversed_, _, _), reverse_time = _timed(
            lambda: per_sample_reverse(_first_samples(model, batch, samples), resolved, tensors, None),
            model.device,
            warm_up=False,
        )
    except Exception as error:  # noqa: BLE001 - any refusal (vmap, a layer that needs a batch): forward mode
        plan.per_sample = False
        _LOG.debug("%s: forward mode (per-sample reverse mode refused: %s)", model.name, _culprit(error))
        return "forward"
    reverse_cost = reverse_time * batch / samples
    if probe is not None:
        agree = all(_close(reversed_[t.label], probe[t.label][:samples]) for t in resolved[:k])
    else:  # no forward-mode probe to compare with: batched reverse mode on the first samples
        agree = _per_sample_agrees(model, resolved, tensors)
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


def _timed(fn: Callable[[], Result], device: torch.device, warm_up: bool = True) -> tuple[Result, float]:
    """``fn()`` and the seconds it took (run twice with ``warm_up``: the first run is not timed)."""
    if warm_up:
        fn()
    _synchronize(device)
    start = time.perf_counter()
    result = fn()
    _synchronize(device)
    return result, time.perf_counter() - start


def _synchronize(device: torch.device) -> None:
    accelerator = getattr(torch, device.type, None) if device.type != "cpu" else None
    if accelerator is not None and hasattr(accelerator, "synchronize"):
        accelerator.synchronize()


def _close(a: Tensor, b: Tensor) -> bool:
    scale = float(b.abs().nan_to_num(0, 0, 0).amax()) if b.numel() else 1.0
    return torch.allclose(a, b, rtol=1e-3, atol=1e-5 * scale, equal_nan=True)


def _per_sample_agrees(model: Model, resolved: Sequence[ResolvedTarget], tensors: dict[str, Tensor]) -> bool:
    """Per-sample reverse mode against batched reverse mode on the first two samples: ``vmap`` over a backward
    pass is only as right as the batching rules of the ops' backward formulas (``torch.cdist``'s is wrong)."""
    with torch.no_grad():
        batch = model({}).shape[0]
    sub = _first_samples(model, batch, min(batch, 2))
    per_sample, _, _ = per_sample_reverse(sub, resolved, tensors, None)
    batched, _, _ = reverse(sub, resolved, tensors, None)
    return all(_close(per_sample[t.label], batched[t.label]) for t in resolved)


def _first_samples(model: Model, batch: int, samples: int) -> Model:
    """``model`` on the first ``samples`` samples of its inputs (every tensor whose first dimension is ``batch``)."""

    def cut(x: Any) -> Any:
        return x[:samples] if isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] == batch else x

    leaves, spec = tree_flatten((model.args, model.kwargs))
    args, kwargs = tree_unflatten([cut(x) for x in leaves], spec)
    sub = Model(model.module, args, kwargs, None, model.runner.api, running_stats=model.running_stats)
    sub.runner, sub.name = model.runner, model.name  # the same function (sensitivity_step) and output checks
    return sub


def _forward(
    model: Model,
    plan: _Plan,
    resolved: Sequence[ResolvedTarget],
    tensors: dict[str, Tensor],
    method: Method,
    chunk_size: int | None,
    api: str,
) -> Result | None:
    """Forward mode, stepping down (steered kernels, one tangent at a time) as ops refuse; ``None`` where
    reverse mode must take over (``method="auto"`` only), after one warning per module naming the op."""
    while True:
        try:
            with forward_ad_kernels(plan.safe_kernels, rnn=plan.rnn):
                return forward(model, resolved, tensors, chunk_size, plan.vectorise)
        except (NotImplementedError, RuntimeError) as error:
            if not _is_unsupported(error):
                raise
            if not plan.safe_kernels:
                plan.safe_kernels = True  # fused kernels first: their composite versions have formulas
            elif plan.vectorise and len(resolved) > 1:
                # torch.func refuses more than dual numbers do (an op without a vmap rule, a custom Function
                # without setup_context, requires_grad_ inside the model): one tangent at a time first
                plan.vectorise = False
            elif method == "forward":
                raise RuntimeError(
                    f"{api}: forward-mode AD is not available for an op in {model.name}: {_culprit(error)}. "
                    "Use method='auto' to fall back to reverse mode, or method='reverse'."
                ) from error
            else:
                plan.reverse = True
                warnings.warn(
                    f"{api}: forward-mode AD is not available for an op in {model.name}: {_culprit(error)}; "
                    "falling back to batched reverse mode, which costs a backward pass per chunk of output "
                    "elements. Pass method='reverse' to skip the forward attempt.",
                    UserWarning,
                    stacklevel=5,
                )
                return None


def _lost(
    model: Model, plan: _Plan, tensors: dict[str, Tensor], missing: list[ResolvedTarget], sens: dict[str, Tensor]
) -> list[tuple[ResolvedTarget, Tensor]]:
    """The ``missing`` targets (no derivative reached the output) that the output moves with nonetheless,
    by central finite differences, with those differences; the others are remembered as independent."""
    todo = [t for t in missing if t.label not in plan.independent]
    if not todo:
        return []
    differences = FiniteDifferences(model, tensors)
    lost = []
    for target in todo:
        moved = differences.depends(target, sens[target.label].dtype)
        if moved is None:
            plan.independent.add(target.label)
        else:
            lost.append((target, moved))
    return lost


def _lost_message(
    api: str, model: Model, lost: Sequence[tuple[ResolvedTarget, Tensor | None]], mode: str, hint: str
) -> str:
    # ``fd`` is None on a process whose own differences did not move: ``_differentiate_sharded`` lists a target
    # that any process saw move on every process, so that they raise together
    listed = ", ".join(
        f"{t.label!r} (central differences of norm {float(torch.linalg.vector_norm(fd)):.3g})"
        if fd is not None
        else f"{t.label!r} (on another process)"
        for t, fd in lost
    )
    return (
        f"{api}: the output of {model.name} moves with {listed}, but no derivative along it reached the output "
        f"in {mode}; it would have been reported as zero. {_LIKELY_CAUSES} {hint}".rstrip()
        + " "
    )


def _culprit(error: BaseException) -> str:
    """The op that refused, as precisely as the error tells: torch's message, the custom ``autograd.Function``
    it came from, and the line of the model's code that called it."""
    text = str(error).strip().splitlines()
    parts = [text[0] if text else type(error).__name__]
    function, site = None, None
    tb = error.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        cls = frame.f_locals.get("cls") if frame.f_code.co_name == "apply" else None
        if isinstance(cls, type) and issubclass(cls, torch.autograd.Function):
            function = cls
        filename = frame.f_code.co_filename
        if not any(filename.startswith(root) for root in _LIBRARY_ROOTS):
            site = f"{filename}:{tb.tb_lineno}"
            line = linecache.getline(filename, tb.tb_lineno).strip()
            site = f"`{line}` ({site})" if line else site
        tb = tb.tb_next
    if function is not None:
        parts.append(f"custom autograd.Function {function.__module__}.{function.__qualname__}")
    if site is not None:
        parts.append(f"called at {site}")
    return "; ".join(parts)


def _is_unsupported(error: BaseException) -> bool:
    if isinstance(error, NotImplementedError):
        return True
    message = str(error).lower()
    return any(marker in message for marker in _UNSUPPORTED_MARKERS)
