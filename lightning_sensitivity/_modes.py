"""The ways of pushing tangents and cotangents through a :class:`~lightning_sensitivity._model.Model`: forward
mode (dual numbers for one target, ``vmap`` over ``jvp`` for several) and batched reverse mode.

Each way returns the sensitivities and the targets whose derivative the output did not carry at all (no
tangent, no grad): zeros are given for those, and the engine (``_engine.py``) decides whether to believe them.
Nothing here chooses between the ways.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch.func import jvp, vmap

from lightning_sensitivity._kernels import forward_ad_kernels
from lightning_sensitivity._model import Model, RandomState, Result, writable
from lightning_sensitivity._products import OneHot, Products
from lightning_sensitivity._refusals import raised_in_backward
from lightning_sensitivity._targets import ResolvedTarget

#: Elements of the one-hot cotangent block the reverse-mode fallback builds at once, by default.
_REVERSE_BLOCK_ELEMENTS = 2**22
_REVERSE_MAX_CHUNK = 256
#: What ``torch.func.jvp(..., strict=True)`` says when the output carries no tangent at all.
INDEPENDENT = "independent of the inputs"


def _one_hot(part: Sequence[ResolvedTarget], tensors: dict[str, Tensor], batched: bool) -> dict[str, Tensor]:
    """Tangents ``{name: [len(part), *shape]}`` (``batched``) or ``{name: shape}``: one 1 per target."""
    tangents = {name: torch.zeros((len(part), *t.shape), dtype=t.dtype, device=t.device) for name, t in tensors.items()}
    for j, target in enumerate(part):
        tangents[target.name][(j, *target.element)] = 1  # an input's: at its element of every sample
    return tangents if batched else {name: t[0] for name, t in tangents.items()}


def _on(device: torch.device, data: Any, dtype: torch.dtype) -> Tensor:
    """``torch.tensor(data)`` on ``device``, without waiting for the device: on CUDA through pinned memory (a copy
    from pageable memory synchronises the stream)."""
    if device.type == "cuda":
        return torch.tensor(data, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
    return torch.tensor(data, dtype=dtype, device=device)


def _rows(part: Sequence[ResolvedTarget], tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Where the one-hot tangents of ``part`` put their 1, row by row, for the tensors that products use as
    weights (two dimensions or more; not inputs, whose tangent is 1 in every sample): ``index[name] [len(part),
    dim]`` and ``mask[name] [len(part)]``, false in the rows of targets in other tensors."""
    index, mask = {}, {}
    inputs = {target.name for target in part if target.is_input}
    for name, tensor in tensors.items():
        if tensor.dim() >= 2 and name not in inputs:
            rows = [target.index if target.name == name else (0,) * tensor.dim() for target in part]
            index[name] = _on(tensor.device, rows, torch.long)
            mask[name] = _on(tensor.device, [target.name == name for target in part], torch.bool)
    return index, mask


def forward(
    model: Model,
    resolved: Sequence[ResolvedTarget],
    tensors: dict[str, Tensor],
    chunk_size: int | None,
    vectorise: bool,
) -> Result:
    """Forward mode: one target by dual numbers; several by ``vmap`` over ``jvp``, ``chunk_size`` at a time
    (one tangent at a time when not ``vectorise``); both under :class:`Products`, unless the model runs a
    backward pass inside (then the chunk is pushed again without it, and the module remembered). Every chunk
    sees the same random numbers (dropout masks), those of a single evaluation."""
    targets = {name: tensor.detach() for name, tensor in tensors.items()}
    made: list[Products] = []

    def products(duals: Iterable[Tensor], one_hot: list[OneHot]) -> Products | None:
        # Products calls kernels directly, past autocast's casts: under autocast, torch's own formulas
        if model.plan.backward_inside or _autocast(model.device):
            return None
        made.append(Products(duals, one_hot))
        return made[-1]

    def output_and_tangent(
        tangent: dict[str, Tensor], index: dict[str, Tensor], mask: dict[str, Tensor]
    ) -> tuple[Tensor, Tensor]:
        def evaluate(duals: dict[str, Tensor]) -> Tensor:
            one_hot = [OneHot(duals[name], index[name], mask[name]) for name in index]
            return cast(Tensor, model(duals, products=products(duals.values(), one_hot)))

        return cast("tuple[Tensor, Tensor]", jvp(evaluate, (targets,), (tangent,), strict=True))

    def push(part: Sequence[ResolvedTarget]) -> tuple[Tensor, Tensor | None]:
        """``(output, columns [len(part), *output.shape])``: ``columns`` is ``None`` when no tangent reached the
        output."""
        if len(part) == 1 and not _autocast(model.device):  # autocast casts a dual's primal, not its tangent
            output, column = _tangent_by_dual_numbers(model, tensors, part[0], products)
            return output, None if column is None else column.unsqueeze(0)
        try:
            tangents = _one_hot(part, tensors, batched=True)
            # out_dims=(None, 0): one output shared by all rows (valid; torch's annotation says int per output)
            batched = vmap(output_and_tangent, randomness="same", out_dims=(None, 0))  # type: ignore[arg-type]
            output, columns = batched(tangents, *_rows(part, tensors))
            return output, columns
        except RuntimeError as error:
            if raised_in_backward(error):  # torch.func cannot run the model's own autograd.grad: one at a time
                raise RuntimeError(
                    f"vmap over jvp cannot run the backward pass inside {model.name}: {error}"
                ) from error
            if INDEPENDENT not in str(error):
                raise
            return model.plain(), None

    step = len(resolved) if chunk_size is None else chunk_size
    step = step if vectorise else 1
    chunks = [resolved[start : start + step] for start in range(0, len(resolved), step)]
    rng = RandomState(model.device)
    out: dict[str, Tensor] = {}
    missing: list[ResolvedTarget] = []
    for number, part in enumerate(chunks):
        if number > 0:
            rng.restore()
        made.clear()
        output, columns = push(part)
        if any(p.backward_ran for p in made):  # its saved tensors may have lacked tangents: again, by torch's rules
            model.plan.backward_inside = True
            rng.restore()
            output, columns = push(part)
        if columns is None:  # no tangent reached the output: zeros, to be confirmed by the caller
            missing.extend(part)
            columns = torch.zeros_like(output).unsqueeze(0).expand(len(part), *output.shape)
        for target, column in zip(part, columns, strict=True):
            out[target.label] = column.detach()
    return out, missing, output.detach()


def _autocast(device: torch.device) -> bool:
    """Whether autocast is on for ``device``'s type."""
    try:
        return bool(torch.is_autocast_enabled(device.type))
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_cpu_enabled() if device.type == "cpu" else torch.is_autocast_enabled()


def _tangent_by_dual_numbers(
    model: Model,
    tensors: dict[str, Tensor],
    target: ResolvedTarget,
    products: Callable[[Iterable[Tensor], list[OneHot]], Products | None],
) -> tuple[Tensor, Tensor | None]:
    """The tangent of the output along one target, pushed with plain dual numbers
    (``torch.autograd.forward_ad``): the formulas of ``torch.func.jvp`` without its wrapping, and, under
    :class:`Products`, without products by zero tangents or by a one-hot weight. Returns the output and its
    tangent, ``None`` when the output carries none.

    Dual numbers silently lose their tangent under inference mode (as do dual numbers made of inference
    tensors), so inference mode is left for the call, and primals, tangents and inputs are made outside it
    (ordinary copies of inference tensors, which the model may then update in place); grad stays off, as the
    caller asked. The dual tensor requires grad, like the parameter it replaces: code that keeps only
    tensors with ``requires_grad`` (adjoint ODE solvers) must not drop it.
    """
    grad = torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    with torch.inference_mode(False), fwAD.dual_level():
        # Only the target's tensor becomes dual: other targets' tensors would carry zero tangents through
        # every op for nothing.
        (tangent,) = _one_hot([target], {target.name: tensors[target.name]}, batched=False).values()
        with torch.enable_grad():
            leaf = writable(tensors[target.name].detach()).requires_grad_(True)
            dual: Tensor = fwAD.make_dual(leaf, tangent)  # type: ignore[no-untyped-call]
        weight = dual.dim() >= 2 and not target.is_input  # an input's tangent is 1 in every sample: not one-hot
        one_hot = [OneHot(dual, _on(dual.device, target.index, torch.long))] if weight else []
        mode = products([dual], one_hot)
        with torch.set_grad_enabled(grad):
            args, kwargs = writable(model.args), writable(model.kwargs)
            output = model({target.name: dual}, args=args, kwargs=kwargs, products=mode)
        primal, out_tangent = fwAD.unpack_dual(output)  # type: ignore[no-untyped-call]
    return primal, out_tangent


def reverse(
    model: Model, resolved: Sequence[ResolvedTarget], tensors: dict[str, Tensor], chunk_size: int | None
) -> Result:
    """Reverse mode, batched over blocks of ``chunk_size`` output elements: one vector-Jacobian product per
    output element, vectorised with ``is_grads_batched``. Runs with grad on and out of inference mode, on
    ordinary copies of inference tensors (autograd cannot save those), and differentiates while the targets'
    leaves are still in place in the module."""
    names = list(tensors)

    def backward(output: Tensor) -> tuple[Tensor, list[tuple[Tensor, list[Tensor | None]]] | None]:
        flat = output.reshape(-1)
        n = flat.numel()
        if not flat.requires_grad:  # no target reaches the output
            return output, None
        step = chunk_size or max(1, min(_REVERSE_MAX_CHUNK, _REVERSE_BLOCK_ELEMENTS // max(n, 1)))
        blocks = []
        for start in range(0, n, step):
            rows = torch.arange(start, min(start + step, n), device=flat.device)
            cotangents = torch.zeros((len(rows), n), dtype=flat.dtype, device=flat.device)
            cotangents[torch.arange(len(rows), device=flat.device), rows] = 1
            blocks.append((rows, _batched_vjp(flat, [leaves[name] for name in names], cotangents)))
        return output, blocks

    with torch.inference_mode(False), torch.enable_grad(), forward_ad_kernels(True, rnn=False):
        leaves = {name: writable(tensor.detach()).requires_grad_(True) for name, tensor in tensors.items()}
        args, kwargs = writable(model.args), writable(model.kwargs)
        output, blocks = model(leaves, then=backward, args=args, kwargs=kwargs, inner_graphs=True)
    output = output.detach()
    out: dict[str, Tensor] = {}
    missing: list[ResolvedTarget] = []
    per_sample = output[0].numel() if output.shape[0] else 1
    for target in resolved:
        k = names.index(target.name)
        if blocks is None or any(grads[k] is None for _, grads in blocks):
            missing.append(target)
            out[target.label] = torch.zeros_like(output)
        elif not blocks:  # an empty output
            out[target.label] = torch.zeros_like(output)
        else:
            parts = [_element_of(cast(Tensor, grads[k]), rows, per_sample, target) for rows, grads in blocks]
            out[target.label] = torch.cat(parts).to(output.dtype).reshape(output.shape)
    return out, missing, output


def _element_of(grads: Tensor, rows: Tensor, per_sample: int, target: ResolvedTarget) -> Tensor:
    """The target's element of each row's gradient ``[C, *shape]``; for an input, of the row's own sample (the
    output element ``rows[c]`` belongs to sample ``rows[c] // per_sample``): sample i's derivative with respect
    to its own input."""
    element: tuple[Any, ...] = (slice(None), *target.index)
    if target.is_input:
        element = (torch.arange(len(rows), device=grads.device), rows // per_sample, *target.index)
    return grads[element]


def _batched_vjp(output: Tensor, inputs: list[Tensor], cotangents: Tensor) -> list[Tensor | None]:
    """Vector-Jacobian products for every row of ``cotangents`` ``[C, N]`` -> grads ``[C, *input.shape]``."""
    try:
        grads = torch.autograd.grad(
            output, inputs, cotangents, retain_graph=True, allow_unused=True, is_grads_batched=True
        )
        return [None if g is None else _dense(g) for g in grads]
    except RuntimeError:
        # A backward formula without a batching rule: one backward pass per row, the slow but sure way.
        rows = [torch.autograd.grad(output, inputs, row, retain_graph=True, allow_unused=True) for row in cotangents]
        return [None if rows[0][i] is None else torch.stack([_dense(r[i]) for r in rows]) for i in range(len(inputs))]


def _dense(grad: Tensor) -> Tensor:
    """A gradient as a strided tensor (``nn.Embedding(sparse=True)`` gives sparse ones)."""
    return grad if grad.layout == torch.strided else grad.to_dense()
