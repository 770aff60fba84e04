"""One forward pass for ``validation_step`` and the monitor: the step's own call of the model computes the
sensitivities too.

The monitor differentiates the step's own call of the module with the batch's input as first argument:
``pl_module(batch[0])`` (or ``pl_module(batch)``), or, where the step passes more, that call with all its
arguments (``self(t, y0)``); ``pl_module(batch[0])`` alone where the step makes no such call. Most
``validation_step``\\ s make that very call, so evaluating it once more after the step would cost a second forward
pass. While a batch is armed, the LightningModule's ``forward`` is replaced (on the instance, as Lightning's own
forward redirection does) by a function that watches the step's calls; the first with the batch's input runs the
sensitivity engine on it and returns the output the engine evaluated (the model's primal output: the same ops on
the same values) to the step. Other calls go to the model's own ``forward`` untouched; where the call cannot be
taken over, the monitor differentiates it after the step.

The call is only taken over where it cannot change what the step sees beyond float rounding (ops that forward
mode routes differently, such as eval-mode batch norm by elementary ops): grad off (the step does not need a
graph from the output), no autocast (the monitor differentiates in the module's own precision), no hooks around
the module's call (they would run twice), not sharded, not compiled. Modules may be in train mode: the engine
starts from the random state the step's call would start from, so one evaluation draws that call's dropout
masks. Where the engine evaluated the model more than once (the first batch's check against finite
differences, probes, fallbacks, chunks of targets) or the evaluation updated a buffer (running statistics in
train mode) or the input in place (the engine works on copies of both), or stored a tensor attribute, the step
gets the model's own call after all, from the random state it would have started from, so that what the model
leaves behind (an attribute, a buffer, the input, the random stream) is that call's. A failure of the engine
inside the step gives the step the model's own output and leaves the batch to the monitor, which then reports
the error where it always has.
"""

from __future__ import annotations

import inspect
import itertools
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_sensitivity._engine import Sensitivities
from lightning_sensitivity._model import RandomState, recording
from lightning_sensitivity._sharded import uses_fsdp

_LOG = logging.getLogger("lightning_sensitivity")

#: The engine's sensitivities (and the output they came from) for the positional and keyword arguments of a call.
Compute = Callable[[tuple[Any, ...], dict[str, Any]], Sensitivities]


def model_input(batch: Any) -> Any:
    """The input the monitor gives the model by default: the batch itself (a tensor) or its first element (of
    any type: a graph of molecules, say); ``None`` for other batches."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and len(batch) > 0:
        return batch[0]
    return None


def can_fuse(module: nn.Module) -> bool:
    """Whether the module's own forward call may be taken over: not compiled, not sharded, no hooks around its
    call. Checked at the call, since the step may have added a hook. Modules in train mode do not stop it (chemprop
    validates with its scaling transforms in train mode, Monte Carlo dropout keeps dropout on): what train mode
    changes is covered where the call is made. The engine evaluates from the random state the step's call would
    start from, so a single evaluation draws that call's dropout masks and leaves the stream where it would; one
    that updates running statistics changes a buffer, and the step then gets the model's own call."""
    if getattr(module, "_compiled_call_impl", None) is not None:  # Module.compile(): dynamo would trace the engine
        return False
    return not (uses_fsdp(module) or _hooked(module))


#: Hooks that run around a module's call: its own, and those registered for every module.
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


def _hooked(module: nn.Module) -> bool:
    """Whether hooks run around the module's call: the step's call runs them around the taken-over forward, and
    the engine's call of the module would run them a second time."""
    return any(getattr(module, name, None) for name in _HOOKS) or any(
        getattr(torch.nn.modules.module, name, None) for name in _GLOBAL_HOOKS
    )


def _plain_context(device: torch.device) -> bool:
    """Grad off (or inference mode) and no autocast for ``device``'s type, as the monitor runs after the step;
    not inside code that dynamo is tracing (a compiled step)."""
    if torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
        return False
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    if is_compiling is not None and is_compiling():
        return False
    try:
        return not torch.is_autocast_enabled(device.type)
    except TypeError:  # torch < 2.4: one query per device type
        return not (torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled())


def _device(module: nn.Module) -> torch.device:
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        return tensor.device
    return torch.device("cpu")


def taken_over(module: nn.Module) -> bool:
    """Whether ``forward`` is set on the instance (by another monitor's :class:`FusedForward`, or by anything
    else): then it is left alone."""
    return "forward" in module.__dict__


def watching(module: nn.Module) -> FusedForward | None:
    """The :class:`FusedForward` that watches ``module``'s calls now (another monitor's), if any."""
    owner = getattr(module.__dict__.get("forward"), "__self__", None)
    return owner if isinstance(owner, FusedForward) else None


#: A call of the module: its positional and keyword arguments.
Call = tuple[tuple[Any, ...], dict[str, Any]]


class FusedForward:
    """Watches ``module.forward`` during one step, until the step calls it with the batch's input ``model_input``
    as first argument (or :meth:`disarm`): the calls before are kept in :attr:`calls`, and that call, in
    :attr:`call`, is the one the monitor differentiates. With ``compute``, and where ``may_take(args, kwargs)``
    allows, that call is taken over: it computes the sensitivities, and the step gets the output the engine
    evaluated. Only where ``forward`` is not :func:`taken_over` already, so that giving it back is deleting the
    instance attribute.

    Attributes:
        calls: the step's calls of the module before :attr:`call` (none with ``model_input`` first).
        call: the step's first call with ``model_input`` as first argument (positional, or bound to ``forward``'s
            first parameter), once made.
        result: the engine's sensitivities, once the step's call gave them.
        failed: the engine's error, when the step's call tried and failed (the step got the model's own output).
    """

    def __init__(
        self,
        module: nn.Module,
        model_input: Any,
        compute: Compute | None = None,
        may_take: Callable[[tuple[Any, ...], dict[str, Any]], bool] = lambda args, kwargs: True,
    ) -> None:
        self.module = module
        self.input = model_input
        self.compute = compute
        self.may_take = may_take
        self.calls: list[Call] = []
        self.call: Call | None = None
        self.result: Sensitivities | None = None
        self.failed: BaseException | None = None
        if taken_over(module):
            raise RuntimeError(f"{type(module).__name__}.forward is taken over already")
        self._original = module.forward
        self._wrapper = self._forward  # one bound method: what is set is what `disarm` looks for
        module.__dict__["forward"] = self._wrapper  # found before the class's forward

    @property
    def armed(self) -> bool:
        return self.module.__dict__.get("forward") is self._wrapper

    def disarm(self) -> None:
        """Give the module its own ``forward`` back (a no-op once done)."""
        if self.armed:
            del self.module.__dict__["forward"]

    def _first_argument(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if args:
            return args[0]
        try:
            bound = inspect.signature(self._original).bind_partial(*args, **kwargs).arguments
        except (TypeError, ValueError):
            return None
        return next(iter(bound.values()), None)

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._first_argument(args, kwargs) is not self.input:
            self.calls.append((args, kwargs))
            return self._original(*args, **kwargs)
        self.disarm()  # the call to differentiate; the engine (and anything the model calls) sees its own forward
        self.call = (args, kwargs)
        device = _device(self.module)
        if self.compute is None or not _plain_context(device) or not can_fuse(self.module):
            return self._original(*args, **kwargs)  # can_fuse at the call: the step may have added a hook
        if not self.may_take(args, kwargs):
            return self._original(*args, **kwargs)
        start = RandomState(device)  # where the step's own call would draw its random numbers from
        try:
            with recording(self.module) as evaluations:
                result = self.compute(args, kwargs)
        except Exception as error:  # noqa: BLE001 - the monitor computes after the step and reports it there
            _LOG.debug("the engine failed inside the step's call (%r); differentiating after the step", error)
            self.failed = error
            start.restore()
            return self._original(*args, **kwargs)
        self.result = result
        if (
            evaluations.count != 1
            or evaluations.buffers_changed
            or evaluations.inputs_changed
            or evaluations.attributes_changed
        ):
            # What the model leaves behind (an attribute, a hook's record, an updated buffer or input) is the
            # last evaluation's, and buffers (and the inputs of a model that updates them) were the engine's
            # copies: the step gets the model's own call, once, from the random state it would have started from.
            start.restore()
            return self._original(*args, **kwargs)
        return result.output
