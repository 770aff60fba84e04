"""What every way of differentiating evaluates: :class:`Model`, a module (or a method of it, such as
``sensitivity_step``) called with some of its tensors replaced, on private copies of its buffers and, until it
is known to leave them alone, of its inputs; and :class:`RandomState`, to replay one evaluation's random
numbers.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from lightning_sensitivity._inputs import replaced
from lightning_sensitivity._kernels import BatchNormByOps, DifferentiableGrad, eager, uncached
from lightning_sensitivity._plans import Plan
from lightning_sensitivity._products import Products
from lightning_sensitivity._targets import ResolvedTarget

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
        attributes_changed: whether one of them set a tensor attribute of a submodule (a scaler's statistic, a
            cache), which was put back as it was before the evaluation.
    """

    module: nn.Module
    count: int = 0
    buffers_changed: bool = False
    inputs_changed: bool = False
    attributes_changed: bool = False


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
    ``running_stats``, computes evaluation-mode batch norm by elementary ops. What it learns of the module
    (whether it updates its inputs in place) goes to the module's ``plan``. ``paths`` names the inputs that are
    targets (``{"args[0]": ("args", 0)}``): a tensor given under such a name replaces that input.
    """

    def __init__(
        self,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        plan: Plan,
        function: Callable[..., Any] | None = None,
        api: str = "per_sample_sensitivities",
        running_stats: bool = False,
        paths: dict[str, tuple[str | int, ...]] | None = None,
    ) -> None:
        self.module = module
        self.plan = plan
        self.paths = {} if paths is None else paths
        #: the inputs as the caller gave them, to read (shapes, dtypes), not to evaluate on: see :attr:`args`
        self.inputs = args, kwargs
        # Until the module is known to leave its inputs alone, evaluations get copies of them: a model that updates
        # its input in place (``x /= 255``) would otherwise compound its updates over the engine's evaluations.
        self._pristine = None if plan.updates_inputs is False else fresh((args, kwargs))
        self.running_stats = running_stats
        self.runner = _Runner(module, function, api)
        self.name = self.runner.name
        self.api = api

    def on(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Model:
        """The same module, function and settings on other inputs (a part of the batch, say)."""
        model = Model(self.module, args, kwargs, self.plan, None, self.api, self.running_stats, self.paths)
        model.runner, model.name = self.runner, self.name
        return model

    @property
    def args(self) -> tuple[Any, ...]:
        """The positional inputs to evaluate on: fresh copies of the given ones unless the module is known to leave
        them alone."""
        return self.inputs[0] if self._pristine is None else fresh(self._pristine[0])

    @property
    def kwargs(self) -> dict[str, Any]:
        """The keyword inputs to evaluate on (see :attr:`args`)."""
        return self.inputs[1] if self._pristine is None else fresh(self._pristine[1])

    @functools.cached_property
    def layout(self) -> Layout:
        """Where the module holds its tensors (read once: a model lives for one call of the engine)."""
        return Layout(self.module)

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
        inputs = {name: tensor for name, tensor in tensors.items() if name in self.paths}
        tensors = {name: tensor for name, tensor in tensors.items() if name not in self.paths}
        private = _private_buffers(self.layout, tensors)
        args = self.args if args is None else args
        kwargs = self.kwargs if kwargs is None else kwargs
        batch_norm = BatchNormByOps() if self.running_stats else contextlib.nullcontext()
        record = _RECORDING.get()
        if record is not None and record.module is not self.module:
            record = None
        if record is not None:
            record.count += 1
        if inputs:  # the targeted inputs, in their place in the call's arguments
            arguments: dict[str, Any] = {"args": args, "kwargs": kwargs}
            for name, tensor in inputs.items():
                arguments = replaced(arguments, self.paths[name], tensor)
            args, kwargs = arguments["args"], arguments["kwargs"]
        versions = _versions((args, kwargs))
        before = {id(copy): copy._version for copy in private.values()}
        swap = Swap(self.layout, {**private, **tensors})
        attributes = Attributes(self.layout.modules)
        with attributes, eager(), uncached(), batch_norm, products or contextlib.nullcontext(), swap:
            with DifferentiableGrad() if inner_graphs else contextlib.nullcontext():
                output = self.runner(args, kwargs)
            if record is not None:  # while the private buffers are in place: replaced ones are seen too
                record.buffers_changed |= swap.changed(before)
            if then is not None:
                output = then(output)
        if record is not None:
            record.attributes_changed |= attributes.changed
        if _versions((args, kwargs)) != versions:  # for good: later calls copy the inputs for every evaluation
            self.plan.updates_inputs = True
            if record is not None:
                record.inputs_changed = True
        elif self.plan.updates_inputs is None:
            self.plan.updates_inputs = False
        return output


class Layout:
    """Where a module holds its tensors: each parameter and buffer by its first name (:attr:`tensors`), and every
    slot that holds it (:attr:`slots`, by the tensor's ``id``): each module object once, however many names it has
    (a tied weight, or a submodule registered under two names). Read once per engine call."""

    def __init__(self, module: nn.Module) -> None:
        self.tensors: dict[str, Tensor] = dict(module.named_parameters())
        self.buffers: dict[str, Tensor] = dict(module.named_buffers())
        self.tensors.update(self.buffers)
        self.modules: list[nn.Module] = list(module.modules())
        self.slots: dict[int, list[tuple[dict[str, Any], str, Tensor]]] = {id(t): [] for t in self.tensors.values()}
        for owner in self.modules:
            for store in (owner._parameters, owner._buffers):
                for attr, own in store.items():
                    if own is not None and id(own) in self.slots:
                        self.slots[id(own)].append((store, attr, own))


class Swap:
    """While active, the module's tensors named in ``replacements`` (by their first name, as in
    ``named_parameters()`` and ``named_buffers()``) are replaced wherever the module holds that very tensor: under
    each of its names, in each module object once (a tied weight, or a submodule registered under two names, such
    as ``self.a = self.b = nn.Linear(...)``). On exit every slot gets its own tensor object back, whatever the
    model did meanwhile. (``torch.func.functional_call`` does not restore a tensor reached through two names of
    one module object: the module kept the swapped-in tensor.)"""

    def __init__(self, layout: Layout, replacements: dict[str, Tensor]) -> None:
        #: (the parameters' or buffers' dict of a module, attribute, own tensor, replacement)
        self.slots = [
            (store, attr, own, new)
            for name, new in replacements.items()
            for store, attr, own in layout.slots[id(layout.tensors[name])]
        ]

    def __enter__(self) -> Swap:
        for store, attr, _, new in self.slots:
            store[attr] = new  # a plain tensor in a Parameter's slot, as torch.func does
        return self

    def __exit__(self, *exc: object) -> None:
        for store, attr, own, _ in self.slots:
            store[attr] = own

    def changed(self, versions: dict[int, int]) -> bool:
        """Whether a replacement whose version counter ``versions`` holds (by ``id``) was updated in place, or
        replaced in one of its slots, since."""
        return any(
            id(new) in versions and (store.get(attr) is not new or new._version != versions[id(new)])
            for store, attr, _, new in self.slots
        )


class Attributes:
    """While active, the tensors a module's submodules hold as plain attributes (not parameters or buffers: a
    scaler's statistics, a cache); on exit, each is put back as it was, whatever the model set meanwhile. A tensor
    the model stores while the engine evaluates it carries the engine's tangent (a functorch wrapper under
    ``vmap``, which can then no longer be saved or pickled), and is not what the model would hold without it."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules
        self.changed = False

    def _read(self) -> dict[tuple[int, str], Tensor]:
        return {
            (i, name): value
            for i, module in enumerate(self.modules)
            for name, value in vars(module).items()
            if isinstance(value, Tensor)
        }

    def __enter__(self) -> Attributes:
        self.before = self._read()
        return self

    def __exit__(self, *exc: object) -> None:
        after = self._read()
        for key, value in after.items():
            if self.before.get(key) is not value:
                self.changed = True
                i, name = key
                if key in self.before:
                    setattr(self.modules[i], name, self.before[key])
                else:
                    delattr(self.modules[i], name)
        for (i, name), value in self.before.items():
            if (i, name) not in after:  # deleted, or replaced by something else than a tensor
                self.changed = True
                setattr(self.modules[i], name, value)


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


def fresh(value: Any) -> Any:
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


def _private_buffers(layout: Layout, skip: dict[str, Tensor]) -> dict[str, Tensor]:
    """Copies of the module's buffers (but those in ``skip``), made outside inference mode: ordinary tensors, whose
    version counters tell an update in place, which the model may make whatever the mode it runs in."""
    with torch.inference_mode(False):
        return {name: buf.clone() for name, buf in layout.buffers.items() if name not in skip}


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

    @contextlib.contextmanager
    def replayed(self) -> Iterator[None]:
        """Evaluate from this state, and leave the generators as they were before: a second evaluation draws the
        random numbers (dropout masks) of the first, and the caller's stream does not move."""
        after = RandomState(self.device)
        self.restore()
        try:
            yield
        finally:
            after.restore()

    def restore(self) -> None:
        """Set the generators back to this state."""
        torch.set_rng_state(self.cpu)
        if self.accelerator is not None:
            if self.device.index is None:
                self.accelerator.set_rng_state(self.state)
            else:
                self.accelerator.set_rng_state(self.state, self.device)


def writable(value: Any) -> Any:
    """Ordinary copies of inference tensors inside ``value`` (see :func:`_map_tensors`), so that autograd may save
    them for backward and the model may update them in place outside inference mode."""
    return _map_tensors(value, lambda x: x.clone() if x.is_inference() else x)
