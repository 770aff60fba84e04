"""Per-sample reverse mode: for many targets and a small output, one backward pass per output element of
each sample, vectorised over samples, whatever the number of targets.

Shapes, with ``B`` samples, ``O`` output elements per sample and ``K`` targets::

    delta [K] (zeros) -> target tensors T + scatter(delta) -> model(one sample) y_i [O]
    vmap over samples of (vjp of y_i w.r.t. delta, vmapped over the O one-hot cotangents) -> J [B, O, K]

``delta`` enters each target's tensor as ``T.index_put(index, delta, accumulate=True)`` (``T`` exactly, in
value), so the backward pass returns the K derivatives themselves rather than per-sample gradients of whole
weight matrices. Each sample is run as a batch of one (``x_i.unsqueeze(0)``), so models written for batches
work unchanged; which inputs are batched is read from their first dimension, and the per-sample outputs are
compared with the batched output, so a model that mixes samples (batch norm in training mode), or an input
taken for batched that is not, is refused rather than differentiated wrongly.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import Tensor
from torch.func import vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from lightning_sensitivity._inputs import fetch
from lightning_sensitivity._model import Model, Result
from lightning_sensitivity._targets import ResolvedTarget

#: Cotangents (output elements) pushed back at once per sample.
_OUTPUT_CHUNK = 64
#: Elements of the per-sample gradients of the targets' tensors held at once, by default: the backward pass
#: through ``T + scatter(delta)`` makes ``d y / d T`` in full, samples × cotangents × numel(T) of them.
_BLOCK_ELEMENTS = 2**25


class NotPerSample(RuntimeError):
    """The model cannot be differentiated sample by sample (it mixes samples, or an input's first dimension is
    not the sample's); the caller uses another mode."""


def per_sample_reverse(
    model: Model,
    resolved: Sequence[ResolvedTarget],
    tensors: dict[str, Tensor],
    chunk_size: int | None,
    output: Tensor | None = None,
    check: bool = True,
) -> Result:
    """``d y[b, o] / d target`` for every sample, output element and target, by reverse mode per sample.

    Args:
        model: what is differentiated (``model.args`` / ``model.kwargs`` hold the batch).
        resolved: the targets.
        tensors: the module's tensors the targets point into, by name.
        chunk_size: samples differentiated at once (memory grows with it); ``None``: as many as keep the
            per-sample gradients of the targets' tensors under about 2^25 elements.
        output: the batched output, if already computed.
        check: compare the per-sample outputs with the batched output (a host synchronisation): do it once per
            model and input layout.

    Raises:
        NotPerSample: the model's per-sample outputs differ from its batched output.
    """
    if output is None:
        output = model.plain()
    batch = output.shape[0]
    leaves, spec = tree_flatten((model.args, model.kwargs))
    batched = [isinstance(leaf, Tensor) and leaf.dim() > 0 and leaf.shape[0] == batch for leaf in leaves]
    if batch == 0 or not any(batched):
        raise NotPerSample("no input has the output's sample dimension first")
    names = list(dict.fromkeys(t.name for t in resolved))
    slots = {name: [k for k, t in enumerate(resolved) if t.name == name] for name in names}
    paths = {t.name: t.path for t in resolved if t.is_input}  # inputs: each sample's own, moved by delta
    if chunk_size is None:
        cotangents = min(max(1, output[0].numel()), _OUTPUT_CHUNK)
        sizes = sum(tensors[name][0].numel() if name in paths else tensors[name].numel() for name in names)
        chunk_size = max(1, _BLOCK_ELEMENTS // (cotangents * sizes))

    def one_sample(delta: Tensor, sample: list[Tensor]) -> Tensor:
        it = iter(sample)
        one = [next(it).unsqueeze(0) if b else leaf for leaf, b in zip(leaves, batched, strict=True)]
        args, kwargs = tree_unflatten(one, spec)
        replaced = {}
        for name in names:
            if name in paths:  # this sample's own input, [1, ...]
                own = fetch({"args": args, "kwargs": kwargs}, paths[name])
                replaced[name] = own.index_put(indices[name], delta[slots[name]].to(own.dtype), accumulate=True)
                continue
            moved = delta[slots[name]].to(fixed[name].dtype)
            if fixed[name].dim() == 0:
                replaced[name] = fixed[name] + moved.sum()  # one target: the tensor itself
            else:
                replaced[name] = fixed[name].index_put(indices[name], moved, accumulate=True)
        return cast(Tensor, model(replaced, args=args, kwargs=kwargs, inner_graphs=True)[0].reshape(-1))

    def jacobian(*sample: Tensor) -> tuple[Tensor, Tensor]:
        # without has_aux, vjp returns (output, vjp_fn); its annotation also allows has_aux's triple
        y, pull = cast("tuple[Tensor, Callable[..., Any]]", vjp(lambda delta: one_sample(delta, list(sample)), delta0))
        eye = torch.eye(y.numel(), dtype=y.dtype, device=y.device)
        (rows,) = vmap(pull, chunk_size=_OUTPUT_CHUNK)(eye)  # [O, K]
        return y, rows

    inputs = [leaf for leaf, b in zip(leaves, batched, strict=True) if b]
    with torch.inference_mode(False), warnings.catch_warnings():
        # everything the backward pass saves must be an ordinary tensor: made here, out of inference mode
        warnings.filterwarnings("ignore", "There is a performance drop because we have not yet implemented")
        first = tensors[names[0]]
        delta0 = torch.zeros(len(resolved), dtype=first.dtype, device=first.device)
        fixed = {name: _ordinary(tensors[name].detach()) for name in names}
        indices = {
            name: tuple(
                torch.tensor(c, device=first.device, dtype=torch.long)
                for c in zip(*(((0,) if name in paths else ()) + resolved[k].index for k in ks), strict=True)
            )
            for name, ks in slots.items()
        }
        inputs = [_ordinary(x) for x in inputs]
        ys, jac = vmap(jacobian, chunk_size=chunk_size)(*inputs)  # [B, O], [B, O, K]
    ys, jac = ys.detach(), jac.detach()
    if check and not _close(ys.reshape(output.shape), output):
        raise NotPerSample("the per-sample outputs differ from the batched output: the model mixes samples")
    out = {t.label: jac[..., k].reshape(output.shape).to(output.dtype) for k, t in enumerate(resolved)}
    return out, [], output


def _ordinary(tensor: Tensor) -> Tensor:
    return tensor.clone() if tensor.is_inference() else tensor


def _close(a: Tensor, b: Tensor) -> bool:
    """Equal up to rounding (batched and per-sample kernels may sum in another order); NaN where NaN."""
    tolerance = 1e3 * torch.finfo(b.dtype).eps
    scale = b.abs().nan_to_num(0, 0, 0).amax().clamp_min(1.0) if b.numel() else torch.ones((), device=b.device)
    both_nan = a.isnan() & b.isnan()
    return bool(((a - b).abs() <= tolerance * scale).logical_or(both_nan).all())
