"""Forward-mode tangents of products, normalisations and arithmetic, without torch's zero terms.

torch's forward-mode formula of a product ``op(a, b)`` (``F.linear``, the convolutions, ``matmul`` and its
relatives) is ``op(a_t, b) + op(a, b_t)``, and a missing tangent is a materialised zero: with a tangent on the
input only, ``F.conv2d`` runs three convolutions where two suffice. Arithmetic with one operand that carries no
tangent (``x * 2.0``, ``x + pos``) and the normalisations (``batch_norm``, ``layer_norm``, ``group_norm``) go
through the same zeros, by a slow generic path. :class:`Products` computes their tangents from the operands
that carry one, and the derivative along one element of a weight (a one-hot tangent) by indexing instead of
a product with a one-hot matrix. The values are the same, up to the order of rounding.

It serves both ways of pushing tangents: plain dual numbers and ``vmap`` over ``torch.func.jvp``, where the
operands seen here are functorch-wrapped and one-hot indices are batched, one row per target.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.autograd.forward_ad as fwAD
import torch.overrides
from torch import Tensor, nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

# The functorch level of a tensor (-1: not wrapped). Private, hence looked up defensively: without it no op is
# rerouted, since an operand wrapped by a transform inside the model (its own ``vmap``) cannot be told apart.
_level: Callable[[Tensor], int] | None = getattr(getattr(torch._C, "_functorch", None), "maybe_get_level", None)

_PLAIN_TYPES = (Tensor, nn.Parameter)
#: Composites written in Python whose inner ops (linear layers, batched products) this mode should see; a
#: mode is otherwise off while the function it intercepted runs. ``redispatch_function`` is torch >= 2.12.
_COMPOSITES = (F.multi_head_attention_forward,)
_redispatch: Callable[..., Any] | None = getattr(torch.overrides, "redispatch_function", None)
_BACKWARD = (torch.autograd.grad, torch.autograd.backward, Tensor.backward)
_aten = torch.ops.aten


class OneHot:
    """``tensor``'s tangent is one-hot: 1 at ``index`` (int64 ``[tensor.dim()]``). Under ``vmap`` ``index`` and
    ``mask`` are batched, one row per target; ``mask`` is false in the rows of targets in other tensors, whose
    tangent is zero. The tensor's version at construction is kept: an in-place update could change its tangent.
    """

    def __init__(self, tensor: Tensor, index: Tensor, mask: Tensor | None = None) -> None:
        self.tensor, self.index, self.mask = tensor, index, mask
        self.version = tensor._version


class Products(TorchFunctionMode):
    """While active, the ops in :data:`_RULES` compute their tangent from the operands that carry one.

    ``duals`` are the tensors that were given tangents (their functorch level is the level this mode works at;
    an operand of a deeper level belongs to a transform inside the model, and its op keeps torch's formula),
    ``one_hot`` those whose tangent is one-hot. Ops keep torch's own formula wherever the shortcut could be
    wrong or gains nothing: when both factors of a product carry tangents, and for tensor subclasses, sparse,
    nested and complex tensors. The reverse-mode graph of a rerouted op saves operands without their tangents:
    :attr:`backward_ran` tells whether the model ran a backward pass that could have used them.
    """

    def __init__(self, duals: Iterable[Tensor], one_hot: Sequence[OneHot] = ()) -> None:
        super().__init__()
        self.one_hot = list(one_hot)
        self.level = max((_level(t) for t in duals), default=-1) if _level is not None else -1
        #: whether the model ran a backward pass: its saved tensors (operands of the ops rerouted here) may have
        #: lacked tangents, and a derivative computed inside the model (forward over reverse) may be wrong
        self.backward_ran = False

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func in _BACKWARD:
            self.backward_ran = True
        try:
            rule = _RULES.get(func)
        except TypeError:  # an unhashable callable: none of ours
            rule = None
        if rule is None or _level is None or any(t not in _PLAIN_TYPES for t in types):
            if func in _COMPOSITES and _redispatch is not None:
                with self:
                    return _redispatch(func, types, args, kwargs)
            return func(*args, **kwargs)
        return rule(self, func, args, kwargs)

    def routable(self, *values: Any) -> bool:
        """Whether the tangent of an op on ``values`` may be computed here."""
        for value in values:
            if isinstance(value, Tensor) and (
                value.layout != torch.strided or value.is_nested or value.is_complex() or _level(value) > self.level  # type: ignore[misc]
            ):
                return False
        return True

    def hot(self, value: Any) -> OneHot | None:
        for one_hot in self.one_hot:
            if value is one_hot.tensor and value._version == one_hot.version:
                return one_hot
        return None


def _split(value: Any) -> tuple[Any, Tensor | None]:
    """``(primal, tangent)`` of an operand; the tangent is ``None`` for numbers, ``None`` and plain tensors."""
    if not isinstance(value, Tensor):
        return value, None
    primal, tangent = fwAD.unpack_dual(value)  # type: ignore[no-untyped-call]
    return primal, tangent


def _like(primal: Tensor, tangent: Tensor) -> Tensor:
    """``tangent`` broadcast to ``primal``'s shape and dtype, as a tensor of its own (never an alias of another
    tensor's tangent, which an in-place op could then change)."""
    if tangent.shape != primal.shape:
        tangent = tangent.expand(primal.shape)
    return tangent.to(primal.dtype, copy=True)


def _dual(primal: Tensor, tangent: Tensor) -> Tensor:
    """``primal`` with ``tangent``. A primal that is a reshaped view of a fresh result (``F.linear`` and
    ``matmul`` on batched inputs return one) is made dual through its base: ``make_dual`` would otherwise
    allocate a tangent for the base and copy ``tangent`` into it."""
    base = primal._base
    if (
        base is not None
        and base.numel() == primal.numel()
        and base.is_contiguous()
        and primal.is_contiguous()
        and tangent.is_contiguous()
    ):
        dual = cast(Tensor, fwAD.make_dual(base, tangent.reshape(base.shape)))  # type: ignore[no-untyped-call]
        return dual.view(primal.shape)
    return cast(Tensor, fwAD.make_dual(primal, tangent))  # type: ignore[no-untyped-call]


def _plus(total: Tensor | None, term: Tensor) -> Tensor:
    return term if total is None else total + term


class _Call:
    """``func(*args, **kwargs)`` whose parameters are read and replaced by name (``names``: the positional ones)."""

    def __init__(
        self, func: Callable[..., Any], names: Sequence[str], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        self.func, self.names, self.args, self.kwargs = func, names, args, kwargs

    def get(self, name: str | None, default: Any = None) -> Any:
        if name is None:
            return default
        if name in self.names and self.names.index(name) < len(self.args):
            return self.args[self.names.index(name)]
        return self.kwargs.get(name, default)

    def __call__(self, **replace: Any) -> Any:
        args = [replace.pop(name, value) for name, value in zip(self.names, self.args, strict=False)]
        return self.func(*args, **(self.kwargs | replace))


# ---- products: linear, convolutions, matmul and relatives ---------------------------------------------------


@dataclass(frozen=True)
class _Product:
    """An op linear in each of ``factors``, plus ``bias`` (scaled by ``beta`` and the product by ``alpha`` when
    ``scaled``, as in ``addmm``); ``one_hot`` writes the derivative along one element of the second factor."""

    names: tuple[str, ...]
    factors: tuple[str, str]
    bias: str | None = None
    scaled: bool = False
    one_hot: Callable[[_Call, Tensor, Tensor, OneHot, Tensor | None], Tensor] | None = None
    one_hot_dim: int | None = None  # the second factor's dimensions the shortcut needs (None: any)


def _product(
    spec: _Product, mode: Products, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    call = _Call(func, spec.names, args, kwargs)
    a, b, c = call.get(spec.factors[0]), call.get(spec.factors[1]), call.get(spec.bias)
    if kwargs.get("out") is not None or not mode.routable(a, b, c):
        return func(*args, **kwargs)
    (pa, ta), (pb, tb), (pc, tc) = _split(a), _split(b), _split(c)
    hot = None
    if spec.one_hot is not None and tb is not None and spec.one_hot_dim in (None, pb.dim()):
        hot = mode.hot(b)
    if hot is None and ((ta is None and tb is None and tc is None) or (ta is not None and tb is not None)):
        return func(*args, **kwargs)  # no tangent, or one on each factor: torch's formula wastes nothing
    fa, fb = spec.factors
    bias = {} if spec.bias is None else {spec.bias: pc}
    primal = call(**{fa: pa, fb: pb}, **bias)

    def term(x: Tensor, w: Tensor, add: Tensor | None) -> Tensor:
        """The product of ``x`` and ``w``, plus ``add`` (the bias's tangent) when given."""
        if not spec.scaled:
            return cast(Tensor, call(**{fa: x, fb: w}, **({} if spec.bias is None else {spec.bias: add})))
        assert spec.bias is not None  # every scaled product (addmm and relatives) has one
        beta = call.get("beta", 1) if add is not None else 0  # beta = 0: the input is ignored, even nan
        return cast(Tensor, call(**{fa: x, fb: w, spec.bias: pc if add is None else add, "beta": beta}))

    tangent = None
    if ta is not None:
        tangent, tc = term(ta, pb, tc), None
    if tb is not None and hot is None:
        tangent = _plus(tangent, term(pa, tb, None))
    if tc is not None:  # only the bias carries a tangent
        if spec.scaled:
            tc = tc * call.get("beta", 1)
        elif pb.dim() > 2:  # a convolution's bias, one per channel
            tc = tc.reshape(-1, *[1] * (pb.dim() - 2))
        tangent = _plus(tangent, _like(primal, tc))
    if hot is not None:
        tangent = spec.one_hot(call, primal, pa, hot, tangent)  # type: ignore[misc]
    assert tangent is not None  # a tangent on one factor or the bias, or a one-hot second factor
    return _dual(primal, tangent)


def _place(primal: Tensor, tangent: Tensor | None, dim: int, at: Tensor, values: Tensor, hot: OneHot) -> Tensor:
    """``tangent`` (zeros when ``None``; else a fresh tensor) plus ``values``, of size 1 along ``dim``, at index
    ``at`` of ``dim``. By ``scatter_add``: under vmap ``at`` differs from row to row, where ``index_add``'s
    batching rule loops over the rows, copying the whole tangent each time."""
    values = values.to(primal.dtype)
    if hot.mask is not None:  # under vmap, rows of targets in other tensors add nothing
        values = torch.where(hot.mask, values, 0)
    index = at.reshape((1,) * primal.dim()).expand(values.shape)
    if tangent is None:
        tangent = torch.zeros_like(primal)
    if hot.mask is None:  # dual numbers: the fresh tangent is ours to update in place
        return tangent.scatter_add_(dim % primal.dim(), index, values)
    return tangent.scatter_add(dim % primal.dim(), index, values)


def _linear_column(call: _Call, primal: Tensor, x: Tensor, hot: OneHot, tangent: Tensor | None) -> Tensor:
    """``d F.linear(x, W) / d W[o, i]`` is ``x[..., i]`` in output column ``o``."""
    return _place(primal, tangent, -1, hot.index[0], x.index_select(-1, hot.index[1:2]), hot)


def _conv_slice(call: _Call, primal: Tensor, x: Tensor, hot: OneHot, tangent: Tensor | None) -> Tensor:
    """``d conv(x, W) / d W[o, i, *k]`` is the input channel that ``i`` reads in ``o``'s group, zero-padded like
    the convolution and sampled at ``k * dilation + stride * p`` for every output position ``p``, placed in
    output channel ``o``."""
    weight = hot.tensor
    n = weight.dim() - 2
    stride, dilation = _expand(call.get("stride", 1), n), _expand(call.get("dilation", 1), n)
    padding = call.get("padding", 0)
    batched = x.dim() == n + 2
    if not batched:
        x = x.unsqueeze(0)
    out, per_group = hot.index[0], weight.shape[0] // call.get("groups", 1)
    channel = torch.div(out, per_group, rounding_mode="floor") * weight.shape[1] + hot.index[1]
    z = x.index_select(1, channel.reshape(1))
    if isinstance(padding, str):  # "same" pads d * (k - 1) in all, the odd one at the end; "valid" nothing
        total = [0 if padding == "valid" else dilation[d] * (weight.shape[2 + d] - 1) for d in range(n)]
        pairs = [(t // 2, t - t // 2) for t in total]
    else:
        pairs = [(p, p) for p in _expand(padding, n)]
    pads = [p for pair in reversed(pairs) for p in pair]
    if any(pads):
        z = F.pad(z, pads)
    for d in range(n):
        size = primal.shape[primal.dim() - n + d]
        positions = hot.index[2 + d] * dilation[d] + stride[d] * torch.arange(size, device=x.device)
        z = z.index_select(2 + d, positions)
    return _place(primal, tangent, primal.dim() - n - 1, out, z if batched else z.squeeze(0), hot)


def _expand(value: Any, n: int) -> tuple[int, ...]:
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    return values * n if len(values) == 1 else values


def _einsum(mode: Products, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``einsum`` is linear in each operand: one term per operand that carries a tangent."""
    if not args or not isinstance(args[0], str) or kwargs:
        return func(*args, **kwargs)
    equation, operands = args[0], list(args[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    if not mode.routable(*operands):
        return func(*args, **kwargs)
    split = [_split(operand) for operand in operands]
    carrying = [i for i, (_, tangent) in enumerate(split) if tangent is not None]
    if not carrying or len(carrying) == len(operands):
        return func(*args, **kwargs)
    primals = [primal for primal, _ in split]
    tangent = None
    for i in carrying:
        tangent = _plus(tangent, func(equation, *primals[:i], split[i][1], *primals[i + 1 :]))
    assert tangent is not None  # ``carrying`` is not empty
    return _dual(func(equation, *primals), tangent)


# ---- arithmetic with one operand that carries no tangent ----------------------------------------------------


def _arithmetic(
    kind: str,
    reverse: bool,
    inplace: bool,
    mode: Products,
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """``left (kind) right`` (``right`` scaled by ``alpha`` for add and sub), the operands of ``func`` swapped
    when ``reverse`` (``__rsub__``, ``__rdiv__``); in place on the first operand when ``inplace``."""
    other = args[1] if len(args) > 1 else kwargs.get("other")
    if len(args) < 1 or len(args) > 2 or kwargs.get("out") is not None or kwargs.get("rounding_mode") is not None:
        return func(*args, **kwargs)
    left, right = (other, args[0]) if reverse else (args[0], other)
    if not mode.routable(left, right) or (kind == "sub" and reverse and not isinstance(other, Tensor)):
        return func(*args, **kwargs)  # ``1 - x``: torch's own formula is fast there
    (pl, tl), (pr, tr) = _split(left), _split(right)
    if (tl is None) == (tr is None):
        return func(*args, **kwargs)  # no tangent, or a tangent on both: nothing is zero
    alpha = kwargs.get("alpha", 1)
    rest = {key: value for key, value in kwargs.items() if key != "other"}
    if inplace:
        if tl is None or mode.level >= 0 or torch.is_grad_enabled():  # would gain a tangent; functorch; autograd
            return func(*args, **kwargs)
        func(pl, pr, **rest)
        if kind in ("mul", "div"):
            func(tl, pr)
        return left
    primals = (pr, pl) if reverse else (pl, pr)
    primal = func(*primals, **rest)
    if kind in ("add", "sub"):
        if tl is not None:
            tangent = _like(primal, tl)
        else:
            assert tr is not None  # exactly one operand carries a tangent
            scale = -alpha if kind == "sub" else alpha
            tangent = _like(primal, tr if scale == 1 else tr * scale)
    elif kind == "mul":
        tangent = tl * pr if tl is not None else pl * tr
    else:  # div
        tangent = tl / pr if tl is not None else -(tr * (primal / pr))
    if tangent.shape != primal.shape or tangent.dtype != primal.dtype:
        tangent = _like(primal, tangent)
    return _dual(primal, tangent)


# ---- pointwise activations under vmap ------------------------------------------------------------------------


def _activation(
    derivative: Callable[[Tensor, dict[str, Any]], Tensor],
    mode: Products,
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """Under vmap over K tangents, torch's formula evaluates the activation's derivative K times (``gelu_backward``
    per row); here it is evaluated once, at the primal that every row shares, and multiplied by the tangents.
    Dual numbers (one tangent) keep torch's fused formula."""
    x = args[0] if args else kwargs.get("input")
    if mode.level < 0 or kwargs.get("inplace") or (len(args) > 1 and args[1] is True) or not mode.routable(x):
        return func(*args, **kwargs)
    px, tx = _split(x)
    if tx is None:
        return func(*args, **kwargs)
    primal = func(px, *args[1:], **kwargs)
    return _dual(primal, tx * derivative(px, kwargs))


def _gelu_derivative(x: Tensor, kwargs: dict[str, Any]) -> Tensor:
    return cast(Tensor, _aten.gelu_backward(torch.ones_like(x), x, approximate=kwargs.get("approximate", "none")))


def _silu_derivative(x: Tensor, kwargs: dict[str, Any]) -> Tensor:
    return cast(Tensor, _aten.silu_backward(torch.ones_like(x), x))


# ---- normalisations ------------------------------------------------------------------------------------------
#
# ``y = xhat * weight + bias``, with ``xhat = (x - mean) * rstd`` over a group of elements; its tangent is
# ``J t_x * weight + xhat * t_weight + t_bias``. ``J`` is the symmetric ``rstd * (I - 11^T / n - xhat xhat^T / n)``
# (batch statistics), so ``J t_x`` is the vector-Jacobian product that torch's fused backward kernels compute,
# called without the affine weight; with running statistics it is ``rstd * t_x``. Tangents on running
# statistics keep torch's formula (or BatchNormByOps).


#: ``(primal, J t_x * weight or None, xhat or None)``, as :func:`_norm`'s ``parts`` return them.
_Parts = tuple[Tensor, Tensor | None, Tensor | None]


def _norm(
    names: tuple[str, ...],
    parts: Callable[[_Call, Tensor, Tensor | None, Tensor | None, Tensor | None, bool], _Parts],
    per_channel: bool,
    mode: Products,
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """``parts(call, x, weight, bias, t_x, xhat_too) -> (primal, J t_x * weight or None, xhat or None)`` on
    primals; the affine weight and bias scale and shift channels (dimension 1) when ``per_channel``."""
    call = _Call(func, names, args, kwargs)
    x, weight, bias = call.get("input"), call.get("weight"), call.get("bias")
    stats = [call.get(name) for name in ("running_mean", "running_var") if name in names]
    if not mode.routable(x, weight, bias, *stats) or any(_split(v)[1] is not None for v in stats):
        return func(*args, **kwargs)
    (px, tx), (pw, tw), (pb, tb) = _split(x), _split(weight), _split(bias)
    if tx is None and tw is None and tb is None:
        return func(*args, **kwargs)
    primal, tangent, xhat = parts(call, px, pw, pb, tx, tw is not None)
    if tw is not None:
        assert xhat is not None  # asked for (``xhat_too``)
        tangent = _plus(tangent, xhat * (_channels(px, tw) if per_channel else tw))
    if tb is not None:
        tb = _channels(px, tb) if per_channel else tb
        tangent = _like(primal, tb) if tangent is None else tangent + tb
    assert tangent is not None  # ``parts`` gives one for ``tx``; ``tw`` and ``tb`` add theirs
    return _dual(primal, tangent.to(primal.dtype))


def _channels(x: Tensor, v: Tensor) -> Tensor:
    return v.reshape((-1,) + (1,) * (x.dim() - 2))


def _bn(call: _Call, x: Tensor, w: Tensor | None, b: Tensor | None, t: Tensor | None, xhat_too: bool) -> _Parts:
    eps = call.get("eps", 1e-5)
    mean, var = call.get("running_mean"), call.get("running_var")
    primal = call(input=x, weight=w, bias=b)  # in training, updates the running statistics as the op would
    if not call.get("training", False) and mean is not None and var is not None:
        rstd = torch.rsqrt(var + eps)
        tangent = None if t is None else t * _channels(t, rstd if w is None else rstd * w)
        return primal, tangent, (x - _channels(x, mean)) * _channels(x, rstd) if xhat_too else None
    xhat, batch_mean, rstd = torch.native_batch_norm(x, None, None, None, None, True, 0.0, eps)
    tangent = None
    if t is not None:
        mask = [True, False, False]
        tangent = _aten.native_batch_norm_backward(t, x, None, None, None, batch_mean, rstd, True, eps, mask)[0]
        tangent = tangent if w is None else tangent * _channels(tangent, w)
    return primal, tangent, xhat


def _ln(call: _Call, x: Tensor, w: Tensor | None, b: Tensor | None, t: Tensor | None, xhat_too: bool) -> _Parts:
    shape = call.get("normalized_shape")
    primal, mean, rstd = torch.native_layer_norm(x, shape, w, b, call.get("eps", 1e-5))
    tangent = None
    if t is not None:
        tangent = _aten.native_layer_norm_backward(t, x, shape, mean, rstd, None, None, [True, False, False])[0]
        tangent = tangent if w is None else tangent * w
    return primal, tangent, (x - mean) * rstd if xhat_too else None


def _gn(call: _Call, x: Tensor, w: Tensor | None, b: Tensor | None, t: Tensor | None, xhat_too: bool) -> _Parts:
    n, c, groups, size = x.shape[0], x.shape[1], call.get("num_groups"), math.prod(x.shape[2:])
    primal, mean, rstd = torch.native_group_norm(x, w, b, n, c, size, groups, call.get("eps", 1e-5))
    tangent = xhat = None
    if t is not None:
        mask = [True, False, False]
        tangent = _aten.native_group_norm_backward(t, x, mean, rstd, None, n, c, size, groups, mask)[0]
        tangent = tangent if w is None else tangent * _channels(tangent, w)
    if xhat_too:
        grouped = x.reshape(n, groups, -1)
        xhat = ((grouped - mean.reshape(n, groups, 1)) * rstd.reshape(n, groups, 1)).reshape(x.shape)
    return primal, tangent, xhat


# ---- the table ----------------------------------------------------------------------------------------------

_LINEAR = _Product(("input", "weight", "bias"), ("input", "weight"), bias="bias", one_hot=_linear_column, one_hot_dim=2)
_CONV = _Product(
    ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    ("input", "weight"),
    bias="bias",
    one_hot=_conv_slice,
)
_CONV_T = _Product(
    ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation"),
    ("input", "weight"),
    bias="bias",
)
_PAIR = _Product(("input", "other"), ("input", "other"))
_MM = _Product(("input", "mat2"), ("input", "mat2"))
_MV = _Product(("input", "vec"), ("input", "vec"))
_TENSORDOT = _Product(("a", "b", "dims"), ("a", "b"))
_ADDMM = _Product(("input", "mat1", "mat2"), ("mat1", "mat2"), bias="input", scaled=True)
_ADDBMM = _Product(("input", "batch1", "batch2"), ("batch1", "batch2"), bias="input", scaled=True)
_ADDMV = _Product(("input", "mat", "vec"), ("mat", "vec"), bias="input", scaled=True)

_PRODUCTS: dict[Callable[..., Any], _Product] = {
    F.linear: _LINEAR,
    F.conv1d: _CONV,
    F.conv2d: _CONV,
    F.conv3d: _CONV,
    F.conv_transpose1d: _CONV_T,
    F.conv_transpose2d: _CONV_T,
    F.conv_transpose3d: _CONV_T,
    torch.matmul: _PAIR,
    Tensor.matmul: _PAIR,
    Tensor.__matmul__: _PAIR,
    torch.mm: _MM,
    Tensor.mm: _MM,
    torch.bmm: _MM,
    Tensor.bmm: _MM,
    torch.mv: _MV,
    Tensor.mv: _MV,
    torch.tensordot: _TENSORDOT,
    torch.addmm: _ADDMM,
    Tensor.addmm: _ADDMM,
    torch.baddbmm: _ADDBMM,
    Tensor.baddbmm: _ADDBMM,
    torch.addbmm: _ADDBMM,
    Tensor.addbmm: _ADDBMM,
    torch.addmv: _ADDMV,
    Tensor.addmv: _ADDMV,
}

_ARITHMETIC: dict[Callable[..., Any], tuple[str, bool, bool]] = {}
for _kind, _functions in cast(
    "dict[str, tuple[Callable[..., Any], ...]]",
    {
        "add": (torch.add, Tensor.add, Tensor.__add__, Tensor.__radd__),
        "sub": (torch.sub, torch.subtract, Tensor.sub, Tensor.subtract, Tensor.__sub__),
        "mul": (torch.mul, torch.multiply, Tensor.mul, Tensor.multiply, Tensor.__mul__, Tensor.__rmul__),
        "div": (
            torch.div,
            torch.divide,
            torch.true_divide,
            Tensor.div,
            Tensor.divide,
            Tensor.true_divide,
            Tensor.__truediv__,
        ),
    },
).items():
    _ARITHMETIC.update({f: (_kind, False, False) for f in _functions})
_ARITHMETIC.update({torch.rsub: ("sub", True, False), Tensor.__rsub__: ("sub", True, False)})
_ARITHMETIC.update({Tensor.__rdiv__: ("div", True, False), Tensor.__rtruediv__: ("div", True, False)})
for _kind, _functions in cast(
    "dict[str, tuple[Callable[..., Any], ...]]",
    {
        "add": (Tensor.add_, Tensor.__iadd__),
        "sub": (Tensor.sub_, Tensor.__isub__),
        "mul": (Tensor.mul_, Tensor.__imul__),
        "div": (Tensor.div_, Tensor.__itruediv__),
    },
).items():
    _ARITHMETIC.update({f: (_kind, False, True) for f in _functions})

_BN_NAMES = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_RULES: dict[Callable[..., Any], Callable[..., Any]] = {
    **{func: functools.partial(_product, spec) for func, spec in _PRODUCTS.items()},
    **{func: functools.partial(_arithmetic, *how) for func, how in _ARITHMETIC.items()},
    torch.einsum: _einsum,
    F.batch_norm: functools.partial(_norm, _BN_NAMES, _bn, True),
    F.layer_norm: functools.partial(_norm, ("input", "normalized_shape", "weight", "bias", "eps"), _ln, False),
    F.group_norm: functools.partial(_norm, ("input", "num_groups", "weight", "bias", "eps"), _gn, True),
    F.gelu: functools.partial(_activation, _gelu_derivative),
    F.silu: functools.partial(_activation, _silu_derivative),
}
