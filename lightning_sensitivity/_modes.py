"""The ways of computing sensitivities: forward mode (dual numbers, ``vmap`` over ``jvp``) and batched reverse
mode, and :class:`Model`, what they evaluate.

Each way returns the sensitivities and the targets whose derivative the output did not carry at all (no
tangent, no grad): zeros are given for those, and ``functional.py`` decides whether to believe them. Nothing
here chooses between the ways.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.func import jvp, vmap

from lightning_sensitivity._kernels import BatchNormByOps, DifferentiableGrad, eager, forward_ad_kernels, uncached
from lightning_sensitivity._products import OneHot, Products
from lightning_sensitivity._refusals import raised_in_backward
from lightning_sensitivity._targets import ResolvedTarget

#: Elements of the one-hot cotangent block the reverse-mode fallback builds at once, by default.
_REVERSE_BLOCK_ELEMENTS = 2**22
_REVERSE_MAX_CHUNK = 256
#: What ``torch.func.jvp(..., strict=True)`` says when the output carries no tangent at all.
_INDEPENDENT = "independent of the inputs"
#: Modules whose forward runs a backward pass (``torch.autograd.grad`` inside): pushed without ``Products``.
_BACKWARD_INSIDE: weakref.WeakSet[nn.Module] = weakref.WeakSet()
#: Whether a module's forward updates its inputs in place, as learned from its evaluations (absent: not known yet).
_UPDATES_INPUTS: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()

#: The sensitivities by label, the targets whose derivative never reached the output, and the output itself.
Result = tuple[dict[str, Tensor], list[ResolvedTarget], Tensor]


@dataclass
class Evaluations:
    """What the engine's evaluations of ``module`` did while :func:`recording`.

    Attributes:
        count: how many times the engine evaluated it (probes, checks and fallbacks included).
        buffers_changed: whether one of them updated or replaced a buffer, which it did on the engine's private
            copy, so that the module did not keep it.
        inputs_changed: whether one of them updated its inputs in place.
    """

    module: nn.Module
    count: int = 0
    buffers_changed: bool = False
    inputs_changed: bool = False


_RECORDING: ContextVar[Evaluations | None] = ContextVar("lightning_sensitivity_recording", default=None)


@contextlib.contextmanager
def recording(module: nn.Module) -> Iterator[Evaluations]:
    """Record the engine's evaluations of ``module`` in this context (see :class:`Evaluations`)."""
    evaluations = Evaluations(module)
    token = _RECORDING.set(evaluations)
    try:
        yield evaluations
    finally:
        _RECORDING.reset(token)


class Model:
    """``module(*args, **kwargs)``, or ``function(*args, **kwargs)`` for a method of ``module`` such as
    ``sensitivity_step``, evaluated with some of the module's tensors replaced by name.

    Every evaluation runs on private copies of the module's buffers (an in-place update, such as BatchNorm's
    running statistics in training mode, leaves the module as it was), runs ``torch.compile``'d code eagerly,
    computes parametrized tensors afresh (not from ``parametrize.cached()``'s cache), and, with
    ``running_stats``, computes evaluation-mode batch norm by elementary ops.
    """

    def __init__(
        self,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        function: Callable[..., Any] | None = None,
        api: str = "per_sample_sensitivities",
        running_stats: bool = False,
    ) -> None:
        self.module = module
        #: the inputs as the caller gave them, to read (shapes, dtypes), not to evaluate on: see :attr:`args`
        self.inputs = args, kwargs
        # Until the module is known to leave its inputs alone, evaluations get copies of them: a model that updates
        # its input in place (``x /= 255``) would otherwise compound its updates over the engine's evaluations.
        self._pristine = None if _UPDATES_INPUTS.get(module) is False else _fresh((args, kwargs))
        self.running_stats = running_stats
        self.runner = _Runner(module, function, api)
        self.name = self.runner.name

    @property
    def args(self) -> tuple[Any, ...]:
        """The positional inputs to evaluate on: fresh copies of the given ones unless the module is known to leave
        them alone."""
        return self.inputs[0] if self._pristine is None else _fresh(self._pristine[0])

    @property
    def kwargs(self) -> dict[str, Any]:
        """The keyword inputs to evaluate on (see :attr:`args`)."""
        return self.inputs[1] if self._pristine is None else _fresh(self._pristine[1])

    @functools.cached_property
    def device(self) -> torch.device:
        """The device of the module's first tensor (looked up once: a model lives for one call of the engine)."""
        for tensor in itertools.chain(self.module.parameters(), self.module.buffers()):
            return tensor.device
        return torch.device("cpu")

    def plain(self) -> Tensor:
        """The output with the module's own tensors, detached, evaluated in the caller's grad mode: a model that
        computes a derivative of its own inside ``forward`` (forces from an energy) needs grad, and may rely on the
        caller's."""
        return cast(Tensor, self({})).detach()

    def __call__(
        self,
        tensors: dict[str, Tensor],
        then: Callable[[Tensor], Any] | None = None,
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
        products: Products | None = None,
        inner_graphs: bool = False,
    ) -> Any:
        """The output with ``tensors`` (name -> tensor) in place of the module's own; with ``then``,
        ``then(output)``, evaluated while they are still in place (a backward pass that re-runs the module,
        as adjoint ODE solvers do, must see them); with ``products``, under that mode (see ``_products.py``); with
        ``inner_graphs``, a derivative the model takes inside (``torch.autograd.grad``) builds its graph, so that
        reverse mode can differentiate it (:class:`~lightning_sensitivity._kernels.DifferentiableGrad`)."""
        private = _private_buffers(self.module, tensors)
        args = self.args if args is None else args
        kwargs = self.kwargs if kwargs is None else kwargs
        batch_norm = BatchNormByOps() if self.running_stats else contextlib.nullcontext()
        record = _RECORDING.get()
        if record is not None and record.module is not self.module:
            record = None
        if record is not None:
            record.count += 1
        versions = _versions((args, kwargs))
        before = {id(copy): copy._version for copy in private.values()}
        swap = Swap(self.module, {**private, **tensors})
        with eager(), uncached(), batch_norm, products or contextlib.nullcontext(), swap:
            with DifferentiableGrad() if inner_graphs else contextlib.nullcontext():
                output = self.runner(args, kwargs)
            if record is not None:  # while the private buffers are in place: replaced ones are seen too
                record.buffers_changed |= swap.changed(before)
            if then is not None:
                output = then(output)
        if _versions((args, kwargs)) == versions:
            _UPDATES_INPUTS.setdefault(self.module, False)
        else:  # for good: later calls copy the inputs for every evaluation
            _UPDATES_INPUTS[self.module] = True
            if record is not None:
                record.inputs_changed = True
        return output


class Swap:
    """While active, the module's tensors named in ``replacements`` (by their first name, as in
    ``named_parameters()`` and ``named_buffers()``) are replaced wherever the module holds that very tensor: under
    each of its names, in each module object once (a tied weight, or a submodule registered under two names, such
    as ``self.a = self.b = nn.Linear(...)``). On exit every slot gets its own tensor object back, whatever the
    model did meanwhile. (``torch.func.functional_call`` does not restore a tensor reached through two names of
    one module object: the module kept the swapped-in tensor.)"""

    def __init__(self, module: nn.Module, replacements: dict[str, Tensor]) -> None:
        named: dict[str, Tensor] = dict(module.named_parameters())
        named.update(module.named_buffers())
        by_id = {id(named[name]): new for name, new in replacements.items()}
        #: (the parameters' or buffers' dict of a module, attribute, own tensor, replacement)
        self.slots = [
            (store, attr, own, by_id[id(own)])
            for owner in module.modules()  # each module object once, however many names it has
            for store in (owner._parameters, owner._buffers)
            for attr, own in store.items()
            if own is not None and id(own) in by_id
        ]

    def __enter__(self) -> Swap:
        for store, attr, _, new in self.slots:
            store[attr] = new  # type: ignore[assignment] # a plain tensor in a Parameter's slot, as torch.func does
        return self

    def __exit__(self, *exc: object) -> None:
        for store, attr, own, _ in self.slots:
            store[attr] = own  # type: ignore[assignment]

    def changed(self, versions: dict[int, int]) -> bool:
        """Whether a replacement whose version counter ``versions`` holds (by ``id``) was updated in place, or
        replaced in one of its slots, since."""
        return any(
            id(new) in versions and (store.get(attr) is not new or new._version != versions[id(new)])
            for store, attr, _, new in self.slots
        )


class _Runner:
    """Calls the module (or ``function``) and checks that the output is one floating-point tensor with a sample
    dimension."""

    def __init__(self, module: nn.Module, function: Callable[..., Any] | None, api: str) -> None:
        self.module = module
        self.function = function
        self.api = api
        owner = type(module).__name__
        self.name = owner if function is None else f"{owner}.{getattr(function, '__name__', 'function')}"

    def __call__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        out = self.module(*args, **kwargs) if self.function is None else self.function(*args, **kwargs)
        if not isinstance(out, Tensor):
            raise TypeError(
                f"{self.api}: {self.name} returned {type(out).__name__}, but sensitivities need one tensor whose "
                "first dimension is the sample; return a tensor, or wrap the model in a function that picks one."
            )
        if out.dim() == 0:
            raise ValueError(
                f"{self.api}: {self.name} returned a 0-dim tensor; the output needs a first dimension that indexes "
                "samples."
            )
        if not out.is_floating_point():
            raise TypeError(f"{self.api}: {self.name} returned a tensor of dtype {out.dtype}, which has no derivative.")
        return out


def _map_tensors(value: Any, fn: Callable[[Tensor], Any]) -> Any:
    """``value`` with ``fn`` applied to every tensor inside: tuples (named ones too), lists and dicts are walked
    and keep their types, subclasses included."""
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, (list, tuple)):
        items = [_map_tensors(v, fn) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, dict):
        return type(value)((k, _map_tensors(v, fn)) for k, v in value.items())
    return value


def _fresh(value: Any) -> Any:
    """Copies of the tensors inside ``value``, outside inference mode, so that a model may update them in place;
    a tensor passed twice is copied once, so that the copies alias as it does."""
    copies: dict[int, Tensor] = {}

    def copy(x: Tensor) -> Tensor:
        if id(x) not in copies:
            copies[id(x)] = x.clone()
        return copies[id(x)]

    with torch.inference_mode(False):
        return _map_tensors(value, copy)


def _versions(value: Any) -> list[int]:
    """The version counters of the tensors inside ``value`` that have one (inference tensors have none)."""
    versions: list[int] = []

    def note(x: Tensor) -> Tensor:
        if not x.is_inference():
            versions.append(x._version)
        return x

    _map_tensors(value, note)
    return versions


def _private_buffers(module: nn.Module, skip: dict[str, Tensor]) -> dict[str, Tensor]:
    """Copies of the module's buffers (but those in ``skip``), made outside inference mode: ordinary tensors, whose
    version counters tell an update in place, which the model may make whatever the mode it runs in."""
    with torch.inference_mode(False):
        return {name: buf.clone() for name, buf in module.named_buffers() if name not in skip}


class RandomState:
    """The random number generators' state (CPU and ``device``'s) at construction, to evaluate a model several
    times under the same dropout masks. Reading it costs no device synchronisation."""

    def __init__(self, device: torch.device) -> None:
        self.accelerator = getattr(torch, device.type, None) if device.type != "cpu" else None
        if self.accelerator is not None and not hasattr(self.accelerator, "get_rng_state"):
            self.accelerator = None
        self.device = device
        self.cpu = torch.get_rng_state()
        self.state = None if self.accelerator is None else self._get()

    def _get(self) -> Tensor:
        assert self.accelerator is not None
        if self.device.index is None:
            return cast(Tensor, self.accelerator.get_rng_state())
        return cast(Tensor, self.accelerator.get_rng_state(self.device))

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.accelerator is not None:
            if self.device.index is None:
                self.accelerator.set_rng_state(self.state)
            else:
                self.accelerator.set_rng_state(self.state, self.device)


def _one_hot(part: Sequence[ResolvedTarget], tensors: dict[str, Tensor], batched: bool) -> dict[str, Tensor]:
    """Tangents ``{name: [len(part), *shape]}`` (``batched``) or ``{name: shape}``: one 1 per target."""
    tangents = {name: torch.zeros((len(part), *t.shape), dtype=t.dtype, device=t.device) for name, t in tensors.items()}
    for j, target in enumerate(part):
        tangents[target.name][(j, *target.index)] = 1
    return tangents if batched else {name: t[0] for name, t in tangents.items()}


def _on(device: torch.device, data: Any, dtype: torch.dtype) -> Tensor:
    """``torch.tensor(data)`` on ``device``, without waiting for the device: on CUDA through pinned memory (a copy
    from pageable memory synchronises the stream)."""
    if device.type == "cuda":
        return torch.tensor(data, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
    return torch.tensor(data, dtype=dtype, device=device)


def _rows(part: Sequence[ResolvedTarget], tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Where the one-hot tangents of ``part`` put their 1, row by row, for the tensors that products use as
    weights (two dimensions or more): ``index[name] [len(part), dim]`` and ``mask[name] [len(part)]``, false in
    the rows of targets in other tensors."""
    index, mask = {}, {}
    for name, tensor in tensors.items():
        if tensor.dim() >= 2:
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
        if model.module in _BACKWARD_INSIDE or _autocast(model.device):
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
            if _INDEPENDENT not in str(error):
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
            _BACKWARD_INSIDE.add(model.module)
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
            leaf = _writable(tensors[target.name].detach()).requires_grad_(True)
            dual: Tensor = fwAD.make_dual(leaf, tangent)  # type: ignore[no-untyped-call]
        one_hot = [OneHot(dual, _on(dual.device, target.index, torch.long))] if dual.dim() >= 2 else []
        mode = products([dual], one_hot)
        with torch.set_grad_enabled(grad):
            args, kwargs = _writable(model.args), _writable(model.kwargs)
            output = model({target.name: dual}, args=args, kwargs=kwargs, products=mode)
        primal, out_tangent = fwAD.unpack_dual(output)  # type: ignore[no-untyped-call]
    return primal, out_tangent


def _writable(value: Any) -> Any:
    """Ordinary copies of inference tensors inside ``value`` (see :func:`_map_tensors`), so that autograd may save
    them for backward and the model may update them in place outside inference mode."""
    return _map_tensors(value, lambda x: x.clone() if x.is_inference() else x)


def reverse(
    model: Model, resolved: Sequence[ResolvedTarget], tensors: dict[str, Tensor], chunk_size: int | None
) -> Result:
    """Reverse mode, batched over blocks of ``chunk_size`` output elements: one vector-Jacobian product per
    output element, vectorised with ``is_grads_batched``. Runs with grad on and out of inference mode, on
    ordinary copies of inference tensors (autograd cannot save those), and differentiates while the targets'
    leaves are still in place in the module."""
    names = list(tensors)

    def backward(output: Tensor) -> tuple[Tensor, list[list[Tensor | None]] | None]:
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
            blocks.append(_batched_vjp(flat, [leaves[name] for name in names], cotangents))
        return output, blocks

    with torch.inference_mode(False), torch.enable_grad(), forward_ad_kernels(True, rnn=False):
        leaves = {name: _writable(tensor.detach()).requires_grad_(True) for name, tensor in tensors.items()}
        args, kwargs = _writable(model.args), _writable(model.kwargs)
        output, blocks = model(leaves, then=backward, args=args, kwargs=kwargs, inner_graphs=True)
    output = output.detach()
    out: dict[str, Tensor] = {}
    missing: list[ResolvedTarget] = []
    for target in resolved:
        k = names.index(target.name)
        if blocks is None or any(block[k] is None for block in blocks):
            missing.append(target)
            out[target.label] = torch.zeros_like(output)
        elif not blocks:  # an empty output
            out[target.label] = torch.zeros_like(output)
        else:
            parts = [block[k][(slice(None), *target.index)] for block in blocks]
            out[target.label] = torch.cat(parts).to(output.dtype).reshape(output.shape)
    return out, missing, output


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
