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
import os
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

import lightning_sensitivity
from lightning_sensitivity._kernels import forward_ad_kernels, has_rnn, running_statistics
from lightning_sensitivity._modes import Model, Result, forward, reverse
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
        method: ``"forward"`` (forward-mode AD), ``"reverse"`` (batched reverse mode, one backward pass per
            output element, vectorised), or ``"auto"``: forward mode, falling back to reverse mode with one
            warning per module where an op has no forward-mode formula.
        chunk_size: how many tangents (forward) or output elements (reverse) are pushed through at once;
            memory grows with it. ``None``: all targets at once in forward mode, and a block of at most
            256 output elements in reverse mode.
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
    return compute_sensitivities(
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


def compute_sensitivities(
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
) -> dict[str, Tensor]:
    """:func:`per_sample_sensitivities` for targets resolved beforehand (the callback resolves them once).

    With ``function`` (a method of ``module`` such as ``sensitivity_step``), ``function(*args, **kwargs)`` is
    differentiated instead of ``module(*args, **kwargs)``, with the module's tensors swapped in the same way.
    With ``on_check``, the result is also compared with finite differences and ``on_check`` receives the
    targets that disagree (an empty list when all agree); the check sees the derivatives before ``normalize``.
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
        sens, output = _differentiate(model, plan, resolved, tensors, method, chunk_size, api)
        if checker is not None and on_check is not None:
            on_check([m for t in resolved if (m := checker.check(t, sens[t.label])) is not None])
        values = {t.label: tensors[t.name].detach()[t.index] for t in resolved}  # on the device: no host sync
    if normalize == "none":
        return sens
    scaled = {}
    for target in resolved:
        theta = values[target.label].to(output.dtype)
        factor = theta if normalize == "parameter" else theta / output
        scaled[target.label] = factor * sens[target.label]
    return scaled


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
) -> tuple[dict[str, Tensor], Tensor]:
    """Forward mode with its fallbacks, then reverse mode where forward mode cannot go; zeros where a
    derivative never reached the output only once finite differences confirm that the output does not move.
    Returns the sensitivities and the output."""
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
    sens, missing, output = reverse(model, resolved, tensors, chunk_size)
    lost = _lost(model, plan, tensors, missing, sens)
    if lost:
        raise SensitivityCheckError(_lost_message(api, model, lost, "either AD mode", ""))
    return sens, output


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


def _lost_message(api: str, model: Model, lost: list[tuple[ResolvedTarget, Tensor]], mode: str, hint: str) -> str:
    listed = ", ".join(
        f"{t.label!r} (central differences of norm {float(torch.linalg.vector_norm(fd)):.3g})" for t, fd in lost
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
