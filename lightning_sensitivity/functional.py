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

import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from torch import Tensor, nn
from torch.func import functional_call

from lightning_sensitivity._modes import Call, forward, forward_ad_kernels, reverse
from lightning_sensitivity._targets import ResolvedTarget, resolve_targets, target_tensors

Method = Literal["auto", "forward", "reverse"]
METHODS: tuple[str, ...] = ("auto", "forward", "reverse")

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


@dataclass
class _Plan:
    """What worked for a module, remembered across calls so that failed attempts are paid once."""

    safe_kernels: bool = False
    vectorise: bool = True
    reverse: bool = False


_PLANS: weakref.WeakKeyDictionary[nn.Module, _Plan] = weakref.WeakKeyDictionary()


def per_sample_sensitivities(
    module: nn.Module,
    targets: str | Sequence[str],
    args: Tensor | tuple[Any, ...],
    kwargs: dict[str, Any] | None = None,
    *,
    method: Method = "auto",
    chunk_size: int | None = None,
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

    Returns:
        A dict from each target's canonical label (``name`` or ``name[i, j]``, negative indices made
        positive), in the order given, to a detached tensor shaped, placed and typed like the output.

    Raises:
        TypeError: the output is not a floating-point tensor, or a target is not floating point.
        ValueError: a bad target, ``method`` or ``chunk_size``; an output without a sample dimension.
        IndexError: a target's index is out of range or of the wrong rank.

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
    resolved = resolve_targets(module, targets, api)
    return compute_sensitivities(module, resolved, args, kwargs, method=method, chunk_size=chunk_size, api=api)


def check_method(method: str, api: str) -> None:
    """Raise a ``ValueError`` naming ``method`` unless it is one of :data:`METHODS`."""
    if method not in METHODS:
        raise ValueError(f"{api}: method must be one of {', '.join(map(repr, METHODS))}; got {method!r}.")


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
) -> dict[str, Tensor]:
    """:func:`per_sample_sensitivities` for targets resolved beforehand (the callback resolves them once).

    With ``function`` (a method of ``module`` such as ``sensitivity_step``), ``function(*args, **kwargs)`` is
    differentiated instead of ``module(*args, **kwargs)``, with the module's tensors swapped in the same way.
    """
    if isinstance(args, Tensor):
        args = (args,)
    elif not isinstance(args, tuple):
        args = tuple(args)
    kwargs = {} if kwargs is None else kwargs
    plan = _PLANS.setdefault(module, _Plan())
    if function is not None:
        module = _Bound(module, function)
        resolved = [replace(t, name=f"{_Bound.PREFIX}{t.name}") for t in resolved]
    tensors = target_tensors(module, resolved)

    def make_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call:
        return _module_call(module, args, kwargs, api)

    if method == "reverse":
        return reverse(module, make_call, resolved, tensors, args, kwargs, chunk_size)

    while not plan.reverse:
        try:
            with forward_ad_kernels(plan.safe_kernels):
                return forward(module, make_call(args, kwargs), resolved, tensors, chunk_size, plan.vectorise)
        except (NotImplementedError, RuntimeError) as error:
            if not _is_unsupported(error):
                raise
            if not plan.safe_kernels:
                plan.safe_kernels = True  # fused CPU kernels first: their composite versions have formulas
            elif plan.vectorise and len(resolved) > 1 and _mentions_vmap(error):
                plan.vectorise = False  # an op with a jvp but no vmap rule: one tangent at a time
            elif method == "forward":
                raise RuntimeError(
                    f"{api}: forward-mode AD is not available for an op in {_describe(module)}: "
                    f"{_first_line(error)} Use method='auto' to fall back to reverse mode, or method='reverse'."
                ) from error
            else:
                plan.reverse = True
                warnings.warn(
                    f"{api}: forward-mode AD is not available for an op in {_describe(module)} "
                    f"({_first_line(error)}); falling back to batched reverse mode, which costs a backward "
                    "pass per chunk of output elements. Pass method='reverse' to skip the forward attempt.",
                    UserWarning,
                    stacklevel=2,
                )
    return reverse(module, make_call, resolved, tensors, args, kwargs, chunk_size)


class _Bound(nn.Module):
    """Calls ``function`` in place of ``forward``, holding the function's module as a child so that
    ``functional_call`` swaps that module's tensors (named ``inner.<name>`` here)."""

    PREFIX = "inner."

    def __init__(self, module: nn.Module, function: Callable[..., Any]):
        super().__init__()
        self.inner = module
        self.function = function
        self.training = module.training

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(*args, **kwargs)


def _describe(module: nn.Module) -> str:
    """The name of what is differentiated, for messages: ``Net`` or ``Net.sensitivity_step``."""
    if isinstance(module, _Bound):
        return f"{type(module.inner).__name__}.{getattr(module.function, '__name__', 'function')}"
    return type(module).__name__


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _is_unsupported(error: BaseException) -> bool:
    if isinstance(error, NotImplementedError):
        return True
    message = str(error).lower()
    return any(marker in message for marker in _UNSUPPORTED_MARKERS)


def _mentions_vmap(error: BaseException) -> bool:
    message = str(error).lower()
    return "vmap" in message or "batching rule" in message or "batched" in message


def _module_call(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], api: str) -> Callable[..., Tensor]:
    name = _describe(module)

    def call(tensors: dict[str, Tensor]) -> Tensor:
        out = functional_call(module, tensors, args, kwargs)
        if not isinstance(out, Tensor):
            raise TypeError(
                f"{api}: {name} returned {type(out).__name__}, but sensitivities need one tensor whose first "
                "dimension is the sample; return a tensor, or wrap the model in a function that picks one."
            )
        if out.dim() == 0:
            raise ValueError(
                f"{api}: {name} returned a 0-dim tensor; the output needs a first dimension that indexes samples."
            )
        if not out.is_floating_point():
            raise TypeError(f"{api}: {name} returned a tensor of dtype {out.dtype}, which has no derivative.")
        return out

    return call
