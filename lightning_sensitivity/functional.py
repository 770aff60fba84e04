"""Per-sample sensitivities of a module's output to named scalars, by forward-mode AD.

This module knows nothing about Lightning. Shapes, with ``B`` samples and ``K`` targets::

    args -> module -> y [B, *out]
    per_sample_sensitivities(...)[target] [B, *out] = d y / d target

Forward mode pushes one tangent per target through the module (``torch.func.jvp``); several targets are
pushed together with ``torch.func.vmap`` over one-hot tangents, ``chunk_size`` at a time, for about
``1 + K`` forward passes in all. Where an op has no forward-mode formula, ``method="auto"`` falls back to
reverse mode, batched over chunks of output elements.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vmap

from lightning_sensitivity._targets import ResolvedTarget, resolve_targets, target_tensors

Method = Literal["auto", "forward", "reverse"]
METHODS: tuple[str, ...] = ("auto", "forward", "reverse")

#: Elements of the one-hot cotangent block the reverse-mode fallback builds at once, by default.
_REVERSE_BLOCK_ELEMENTS = 2**22
_REVERSE_MAX_CHUNK = 256

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
    warned: bool = False


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
    if method == "reverse":
        return _reverse(module, resolved, tensors, args, kwargs, chunk_size, api)

    while not plan.reverse:
        try:
            with _forward_ad_kernels(plan.safe_kernels):
                return _forward(module, resolved, tensors, args, kwargs, chunk_size, plan.vectorise, api)
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
    return _reverse(module, resolved, tensors, args, kwargs, chunk_size, api)


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


@contextlib.contextmanager
def _forward_ad_kernels(enabled: bool) -> Iterator[None]:
    """Steer ops away from fused CPU kernels that have no forward-mode formula, restoring every flag after.

    ``nn.LSTM`` (oneDNN RNN kernel), the ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` fast path
    (taken when grad is off) and the fused attention kernels of ``scaled_dot_product_attention`` all compute
    the same result through composite ops, which forward mode can differentiate.
    """
    if not enabled:
        yield
        return
    mkldnn = torch.backends.mkldnn
    params = inspect.signature(mkldnn.flags).parameters
    current = {k: getattr(mkldnn, k) for k in ("deterministic", "allow_tf32", "fp32_precision") if k in params}
    mha = torch.backends.mha
    fastpath = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        with mkldnn.flags(enabled=False, **current), _math_attention():
            yield
    finally:
        mha.set_fastpath_enabled(fastpath)


def _math_attention() -> contextlib.AbstractContextManager[None]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


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


def _private_buffers(module: nn.Module, skip: dict[str, Tensor]) -> dict[str, Tensor]:
    """Copies of the module's buffers (but those in ``skip``), so that an in-place update inside the forward
    call, such as BatchNorm's running statistics in training mode, leaves the module as it was."""
    return {name: buf.clone() for name, buf in module.named_buffers() if name not in skip}


def _one_hot(part: Sequence[ResolvedTarget], tensors: dict[str, Tensor], batched: bool) -> dict[str, Tensor]:
    """Tangents ``{name: [len(part), *shape]}`` (``batched``) or ``{name: shape}``: one 1 per target."""
    tangents = {name: torch.zeros((len(part), *t.shape), dtype=t.dtype, device=t.device) for name, t in tensors.items()}
    for j, target in enumerate(part):
        tangents[target.name][(j, *target.index)] = 1
    return tangents if batched else {name: t[0] for name, t in tangents.items()}


def _forward(
    module: nn.Module,
    resolved: Sequence[ResolvedTarget],
    tensors: dict[str, Tensor],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    chunk_size: int | None,
    vectorise: bool,
    api: str,
) -> dict[str, Tensor]:
    call = _module_call(module, args, kwargs, api)
    targets = {name: tensor.detach() for name, tensor in tensors.items()}

    def tangent_of_output(tangent: dict[str, Tensor]) -> Tensor:
        # Buffers are copied inside the transform: a transform forbids in-place updates of captured tensors.
        return jvp(lambda t: call({**_private_buffers(module, t), **t}), (targets,), (tangent,))[1]

    step = len(resolved) if chunk_size is None else chunk_size
    step = step if vectorise else 1
    out: dict[str, Tensor] = {}
    for start in range(0, len(resolved), step):
        part = resolved[start : start + step]
        if len(part) == 1:
            columns = tangent_of_output(_one_hot(part, tensors, batched=False)).unsqueeze(0)
        else:
            columns = vmap(tangent_of_output)(_one_hot(part, tensors, batched=True))
        for target, column in zip(part, columns, strict=True):
            out[target.label] = column.detach()
    return out


def _writable(value: Any) -> Any:
    """Ordinary copies of inference tensors inside ``value`` (tuples, lists and dicts are walked), so that
    autograd may save them for backward."""
    if isinstance(value, Tensor):
        return value.clone() if value.is_inference() else value
    if isinstance(value, (list, tuple)):
        items = [_writable(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, dict):
        return type(value)((k, _writable(v)) for k, v in value.items())
    return value


def _reverse(
    module: nn.Module,
    resolved: Sequence[ResolvedTarget],
    tensors: dict[str, Tensor],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    chunk_size: int | None,
    api: str,
) -> dict[str, Tensor]:
    with torch.inference_mode(False), torch.enable_grad(), _forward_ad_kernels(True):
        leaves = {name: _writable(tensor.detach()).requires_grad_(True) for name, tensor in tensors.items()}
        call = _module_call(module, _writable(args), _writable(kwargs), api)
        output = call({**_writable(_private_buffers(module, leaves)), **leaves})
        flat = output.reshape(-1)
        n = flat.numel()
        names = list(leaves)
        columns: dict[str, list[Tensor]] = {t.label: [] for t in resolved}
        if flat.requires_grad:
            step = chunk_size or max(1, min(_REVERSE_MAX_CHUNK, _REVERSE_BLOCK_ELEMENTS // max(n, 1)))
            for start in range(0, n, step):
                rows = torch.arange(start, min(start + step, n), device=flat.device)
                cotangents = torch.zeros((len(rows), n), dtype=flat.dtype, device=flat.device)
                cotangents[torch.arange(len(rows), device=flat.device), rows] = 1
                grads = _batched_vjp(flat, [leaves[name] for name in names], cotangents)
                for target in resolved:
                    grad = grads[names.index(target.name)]
                    if grad is None:
                        grad = torch.zeros((len(rows),), dtype=flat.dtype, device=flat.device)
                    else:
                        grad = grad[(slice(None), *target.index)].to(flat.dtype)
                    columns[target.label].append(grad)
    if not flat.requires_grad:  # the output depends on no target
        return {t.label: torch.zeros_like(output).detach() for t in resolved}
    return {label: torch.cat(parts).reshape(output.shape).detach() for label, parts in columns.items()}


def _batched_vjp(output: Tensor, inputs: list[Tensor], cotangents: Tensor) -> list[Tensor | None]:
    """Vector-Jacobian products for every row of ``cotangents`` ``[C, N]`` -> grads ``[C, *input.shape]``."""
    try:
        return list(
            torch.autograd.grad(output, inputs, cotangents, retain_graph=True, allow_unused=True, is_grads_batched=True)
        )
    except RuntimeError:
        # A backward formula without a batching rule: one backward pass per row, the slow but sure way.
        rows = [torch.autograd.grad(output, inputs, row, retain_graph=True, allow_unused=True) for row in cotangents]
        return [
            None if rows[0][i] is None else torch.stack([r[i] for r in rows])  # type: ignore[misc]
            for i in range(len(inputs))
        ]
