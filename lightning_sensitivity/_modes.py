"""The two ways of computing sensitivities: forward mode (dual numbers, ``vmap`` over ``jvp``) and batched
reverse mode, plus the kernel steering that lets forward mode through fused CPU kernels.

``call(tensors)`` evaluates the model with ``tensors`` (name -> tensor) in place of its own; targets are
resolved beforehand. Nothing here decides between the two ways: ``functional.py`` does.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.func import jvp, vmap
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from lightning_sensitivity._targets import ResolvedTarget

Call = Callable[[dict[str, Tensor]], Tensor]

#: Elements of the one-hot cotangent block the reverse-mode fallback builds at once, by default.
_REVERSE_BLOCK_ELEMENTS = 2**22
_REVERSE_MAX_CHUNK = 256


@contextlib.contextmanager
def forward_ad_kernels(enabled: bool) -> Iterator[None]:
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


def forward(
    module: nn.Module,
    call: Call,
    resolved: Sequence[ResolvedTarget],
    tensors: dict[str, Tensor],
    chunk_size: int | None,
    vectorise: bool,
) -> dict[str, Tensor]:
    """Forward mode: one target by dual numbers; several by ``vmap`` over ``jvp``, ``chunk_size`` at a time
    (one tangent at a time when not ``vectorise``)."""
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
            columns = _tangent_by_dual_numbers(module, call, tensors, part[0]).unsqueeze(0)
        else:
            columns = vmap(tangent_of_output)(_one_hot(part, tensors, batched=True))
        for target, column in zip(part, columns, strict=True):
            out[target.label] = column.detach()
    return out


def _tangent_by_dual_numbers(
    module: nn.Module, call: Call, tensors: dict[str, Tensor], target: ResolvedTarget
) -> Tensor:
    """The tangent of the output along one target, pushed with plain dual numbers
    (``torch.autograd.forward_ad``): the formulas of ``torch.func.jvp`` without its wrapping, and, for an
    element of a weight that ``F.linear`` uses, without the dense product by a one-hot matrix.

    Dual numbers silently lose their tangent under inference mode (as do dual numbers made of inference
    tensors), so inference mode is left for the call, and primals and tangents are made outside it; grad stays
    off, as the caller asked. Inference tensors among the inputs are only read.
    """
    grad = torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    with torch.inference_mode(False), torch.set_grad_enabled(grad), fwAD.dual_level():
        # Only the target's tensor becomes dual: other targets' tensors would carry zero tangents through
        # every op for nothing.
        (tangent,) = _one_hot([target], {target.name: tensors[target.name]}, batched=False).values()
        dual = fwAD.make_dual(_writable(tensors[target.name].detach()), tangent)
        duals = {target.name: dual}
        linear = _OneHotLinear(dual, target.index) if dual.dim() == 2 else contextlib.nullcontext()
        with linear:
            output = call({**_private_buffers(module, duals), **duals})
        out_tangent = fwAD.unpack_dual(output).tangent
    return torch.zeros_like(output) if out_tangent is None else out_tangent


class _OneHotLinear(TorchFunctionMode):
    """While active, ``F.linear(x, weight, bias)`` with ``weight`` the dual target (tangent ``E_ij``, one-hot)
    adds the tangent ``x[..., j]`` to output column ``i`` directly, instead of the product ``x @ E_ij^T``:
    ``in x out`` multiply-adds per sample, nearly all by zero, that cost as much as the layer itself. The
    values are the same (and a non-finite ``x[..., k != j]`` no longer leaks in as ``0 * inf``). Every other
    use of the weight goes through ordinary forward mode.
    """

    def __init__(self, weight: Tensor, index: tuple[int, ...]) -> None:
        super().__init__()
        self.weight = weight
        self.primal = fwAD.unpack_dual(weight).primal
        self.row, self.col = index

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.linear:
            return func(*args, **kwargs)
        params = dict(zip(("input", "weight", "bias"), args, strict=False)) | kwargs
        if params.get("weight") is not self.weight:
            return func(*args, **kwargs)
        x = params["input"]
        y = F.linear(x, self.primal, params.get("bias"))  # carries the tangents of x and bias, if any
        y_primal, y_tangent = fwAD.unpack_dual(y)
        tangent = torch.zeros_like(y_primal) if y_tangent is None else y_tangent.clone()
        tangent[..., self.row] += fwAD.unpack_dual(x).primal[..., self.col]
        return fwAD.make_dual(y_primal, tangent)


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


def reverse(
    module: nn.Module,
    make_call: Callable[[tuple[Any, ...], dict[str, Any]], Call],
    resolved: Sequence[ResolvedTarget],
    tensors: dict[str, Tensor],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    chunk_size: int | None,
) -> dict[str, Tensor]:
    """Reverse mode, batched over blocks of ``chunk_size`` output elements: one vector-Jacobian product per
    output element, vectorised with ``is_grads_batched``. Runs with grad on and out of inference mode, on
    ordinary copies of inference tensors (autograd cannot save those)."""
    with torch.inference_mode(False), torch.enable_grad(), forward_ad_kernels(True):
        leaves = {name: _writable(tensor.detach()).requires_grad_(True) for name, tensor in tensors.items()}
        call = make_call(_writable(args), _writable(kwargs))
        output = call({**_private_buffers(module, leaves), **leaves})  # copies made here are ordinary tensors
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
