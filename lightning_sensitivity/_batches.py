"""How the monitor differentiates one batch: what is differentiated (``sensitivity_step``, the step's own call of
the module, the default call), with which options of the engine (the first batch's check against finite
differences, rank 0's choice of mode, NaN for lost derivatives under ``verify="warn"``), inside the step's call
where it may be taken over (``_fused.py``), and with the random stream left as the step left it.

One :class:`Differentiator` serves a monitor for one Trainer run (from ``setup``); it owns the run's
:class:`~lightning_sensitivity.Plans`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any, Literal

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_sensitivity._engine import Method, Normalize, Sensitivities, choice_pending, sensitivities_and_output
from lightning_sensitivity._epoch import several_processes
from lightning_sensitivity._fused import Call, FusedForward, model_input, taken_over, watching
from lightning_sensitivity._inputs import fetch, is_input, locate, path_text
from lightning_sensitivity._model import RandomState
from lightning_sensitivity._plans import Plans
from lightning_sensitivity._targets import LazyTargetError, ResolvedTarget, resolve_all
from lightning_sensitivity._verify import Mismatch, SensitivityCheckError, mismatch_message

API = "SensitivityMonitor"
API_TARGETS = f"{API}(targets=...)"
_STAGE_WORDS = {"validate": "validation", "test": "test", "predict": "predict"}


class Differentiator:
    """Differentiates the monitor's batches for one Trainer run.

    Attributes:
        resolved: the targets, once resolved (targets inside lazy modules: after the first step).
        plans: what the engine learned about the module in this run.
        decided: a batch was differentiated, so the first batch's decisions, collectives under several
            processes (the check, the choice of mode), are taken.
    """

    def __init__(
        self,
        targets: list[str],
        method: Method,
        chunk_size: int | None,
        normalize: Normalize,
        verify: Literal["error", "warn", False],
        step: Callable[..., Any] | None = None,
    ) -> None:
        self.targets, self.method, self.chunk_size, self.normalize, self.verify = (
            targets,
            method,
            chunk_size,
            normalize,
            verify,
        )
        self.step = step  # SensitivityMonitor(step=...): step(pl_module, batch, batch_idx[, dataloader_idx])
        self.resolved: list[ResolvedTarget] = []
        self.pending = False  # targets inside lazy modules, and inputs: resolved at the first batch
        self._inputs: set[str] = set()  # the targets that name inputs in the batch
        self._batch: Any = None
        self.plans = Plans()
        self.decided = False
        self._to_verify = bool(verify)  # the first batch differentiated is checked against finite differences
        self._take_over_failed = False  # the engine failed inside the step's call: after the step from then on
        self._watch: FusedForward | None = None
        self._owns_watch = False
        self._warned: set[str] = set()

    @property
    def labels(self) -> list[str]:
        return [t.label for t in self.resolved]

    # ---- targets -----------------------------------------------------------------------------------------------

    def resolve(self, pl_module: LightningModule) -> None:
        """Resolve the targets in ``setup``; those inside lazy modules, and inputs (``batch[0][:, 3]``), at the first
        batch (:meth:`resolve_late`)."""
        self._inputs = {text for text in self.targets if _names_input(pl_module, text)}
        own = [text for text in self.targets if text not in self._inputs]
        try:
            resolved = resolve_all(pl_module, own, API_TARGETS, {}) if own else []
        except LazyTargetError:
            self.resolved, self.pending = [], True
            return
        self.resolved, self.pending = ([], True) if self._inputs else (resolved, False)

    def resolve_late(self, pl_module: LightningModule, batch: Any) -> None:
        try:
            self.resolved = resolve_all(pl_module, self.targets, API_TARGETS, {"batch": batch})
        except LazyTargetError as error:
            raise LazyTargetError(
                f"{error} The monitor resolves such targets after the first validation_step (test_step, "
                "predict_step); this one is still uninitialized then: make sure that step runs the module that "
                "holds it."
            ) from None
        self.pending = False

    def check_inputs(self, module: LightningModule, batch: Any) -> None:
        """Check the input targets on the first training batch where no validation batch came before it (the
        sanity check is off), so that a bad one fails before the first training step rather than after the
        first epoch; they are resolved on the first validation batch all the same."""
        inputs = [text for text in self.targets if text in self._inputs]
        if not inputs or not self.pending:
            return
        try:
            resolve_all(module, inputs, API_TARGETS, {"batch": batch})
        except (ValueError, TypeError, IndexError) as error:
            message = (
                f"{error} (Checked on the first training batch, as the sanity check is off: a validation batch "
                "of another structure than the training batches needs num_sanity_val_steps > 0 to be checked "
                "itself.)"
            )
            raise type(error)(message) from None

    # ---- the step's calls --------------------------------------------------------------------------------------

    def arm(self, trainer: Trainer, stage: str, batch: Any, dry_run: bool) -> None:
        """Watch the step's calls of the module (``_fused.py``): the first with the batch's input first is the call
        to differentiate, and it computes the sensitivities itself where it may (:meth:`_may_take_over`)."""
        self.disarm()
        self._batch = batch
        module = trainer.lightning_module
        x = model_input(batch)
        if x is None or self._function(module) is not None:
            return
        if taken_over(module):  # another monitor watches the same calls: read them from its watch
            self._watch, self._owns_watch = watching(module), False
            return
        compute = functools.partial(self._compute, stage, trainer) if self._may_take_over(dry_run) else None
        self._watch = FusedForward(module, x, compute, functools.partial(self._may_take, trainer))
        self._owns_watch = True

    def _may_take_over(self, dry_run: bool) -> bool:
        """Whether the step's call may compute this batch's sensitivities."""
        return not (
            self._take_over_failed  # it failed once: the monitor reports errors after the step, from then on
            or self.pending  # lazy targets are resolved after the first step
            or dry_run  # the sanity check differentiates a batch only to check the model: after the step
        )

    def _may_take(self, trainer: Trainer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Under several processes, only calls whose decisions (collectives) were taken on an earlier batch."""
        if not several_processes(trainer):
            return True
        pending = choice_pending(self.plans, trainer.lightning_module, self.resolved, args, kwargs, method=self.method)
        return self.decided and not pending

    def _compute(self, stage: str, trainer: Trainer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Sensitivities:
        return self._engine(stage, trainer, args, kwargs, None)

    def disarm(self) -> FusedForward | None:
        """Stop watching; the watch, with what it saw of the step."""
        watch, self._watch = self._watch, None
        if watch is not None and self._owns_watch:
            watch.disarm()
        return watch

    # ---- one batch ---------------------------------------------------------------------------------------------

    def differentiate(
        self, trainer: Trainer, stage: str, batch: Any, batch_idx: int, dataloader_idx: int
    ) -> Sensitivities:
        """The batch's sensitivities: from the step's call where it computed them, else after the step."""
        self._batch = batch
        watch, owned = self._watch, self._owns_watch
        self.disarm()
        if watch is not None and owned and watch.result is not None:
            sens = watch.result
        else:
            if watch is not None and owned and watch.failed is not None:
                self._take_over_failed = True  # done again here, where errors are reported
            sens = self._after_step(trainer, stage, batch, batch_idx, dataloader_idx, self._step_call(trainer, watch))
        self.decided = True
        self._check_rows(trainer, batch, sens.values)
        return sens

    def _step_call(self, trainer: Trainer, watch: FusedForward | None) -> Call | None:
        """The step's first call of the module with the batch's input first; ``None`` where it made none (then the
        default call, with one warning where the step called the module otherwise)."""
        if watch is None or watch.call is not None:
            return None if watch is None else watch.call
        if watch.calls and self._first("call"):
            name = type(trainer.lightning_module).__name__
            made, default = describe(name, watch.calls[0]), describe(name, ((watch.input,), {}))
            rank_zero_warn(
                f"{API}: the step called {made}, never with the batch's input as first argument, so the monitor "
                f"differentiates the default call {default}, at inputs the step did not use. Define "
                f"`sensitivity_step(self, batch, batch_idx)` on {name} (or pass `step=` to the monitor) to return the "
                "output to differentiate, shaped [samples, ...] (for example the step's own call)."
            )
        return None

    def _after_step(
        self, trainer: Trainer, stage: str, batch: Any, batch_idx: int, dataloader_idx: int, call: Call | None
    ) -> Sensitivities:
        module = trainer.lightning_module  # never a strategy wrapper
        function = self._function(module)
        args, kwargs = self._what(module, function, batch, batch_idx, dataloader_idx, call)
        try:
            with RandomState(module.device).replayed():  # later steps draw what they would without the monitor
                sens = self._engine(stage, trainer, args, kwargs, function)
        except Exception as error:
            if function is not None or _ours(error):
                raise
            raise _in_default_call(error, type(module).__name__, (args, kwargs), call is not None) from error
        return sens

    def _what(
        self,
        module: LightningModule,
        function: Callable[..., Any] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
        call: Call | None,
    ) -> Call:
        """The arguments to differentiate at: ``function``'s (the monitor's ``step`` or ``sensitivity_step``, see
        :meth:`_function`), the step's own call's, or the default call's."""
        if function is not None:
            third = _takes_dataloader_idx(function)
            return ((batch, batch_idx, dataloader_idx) if third else (batch, batch_idx)), {}
        if call is not None:  # the step's own call, with every argument it passed
            return call
        x = model_input(batch)
        if x is None:
            raise TypeError(
                f"{API}: cannot tell the model's input in a batch of type {type(batch).__name__}; define "
                f"`sensitivity_step(self, batch, batch_idx)` on {type(module).__name__} (or pass `step=` to the "
                "monitor) to return the output to differentiate, shaped [samples, ...] (for example `return "
                "self(batch['x'])`)."
            )
        _check_forward_takes(module, (x,))
        return (x,), {}

    def _engine(
        self,
        stage: str,
        trainer: Trainer,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        function: Callable[..., Any] | None,
    ) -> Sensitivities:
        """One call of the engine; until one has completed, also checked against finite differences (a call that
        fails inside the step's call, check included, is made again after the step)."""
        on_check = functools.partial(self._on_check, trainer, _STAGE_WORDS[stage]) if self._to_verify else None
        result = sensitivities_and_output(
            trainer.lightning_module,
            self._in_call(trainer.lightning_module, args, kwargs),
            args,
            kwargs,
            plans=self.plans,
            method=self.method,
            chunk_size=self.chunk_size,
            function=function,
            api=API,
            on_check=on_check,
            normalize=self.normalize,
            agree=functools.partial(trainer.strategy.broadcast, src=0) if several_processes(trainer) else None,
            on_lost=self._on_lost if self.verify == "warn" else None,
        )
        self._to_verify = False
        return result

    def _in_call(self, module: LightningModule, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[ResolvedTarget]:
        """The targets for one call: input targets found in this batch and placed at their tensor's path in the
        call's arguments (``batch[0]`` is ``args[0]`` of ``pl_module(batch[0])``, ``args[0][0]`` of
        ``sensitivity_step(batch, batch_idx)``)."""
        if not self._inputs:
            return self.resolved
        arguments = {"args": args, "kwargs": kwargs}
        found = resolve_all(module, self.targets, API_TARGETS, {"batch": self._batch})
        if [t.label for t in found] != self.labels:
            raise ValueError(
                f"{API_TARGETS}: this batch gives the targets {[t.label for t in found]}, the first gave "
                f"{self.labels}: inputs named with slices must keep their shape from batch to batch."
            )
        placed = []
        for target in found:
            if target.is_input:
                path = locate(fetch({"batch": self._batch}, target.path), arguments)
                if path is None:
                    raise ValueError(
                        f"{API_TARGETS}: {target.label!r} names {target.name}, which the call the monitor "
                        f"differentiates, {describe(type(module).__name__, (args, kwargs))}, does not take. Define "
                        f"`sensitivity_step(self, batch, batch_idx)` on {type(module).__name__} (or pass `step=` to "
                        "the monitor) to compute the output from the batch, or name an input the step passes to the "
                        "model."
                    )
                target = dataclasses.replace(target, name=path_text(str(path[0]), path[1:]), path=path)
            placed.append(target)
        return placed

    def _on_check(self, trainer: Trainer, stage_word: str, mismatches: list[Mismatch]) -> None:
        """The verdict of the finite-difference check on this process's first batch; every process learns
        whether any failed, so that they stop together."""
        failed = trainer.strategy.reduce_boolean_decision(bool(mismatches), all=False)
        if not failed:
            return
        hint = "Pass verify='warn' to log this and go on, or verify=False to skip the check."
        if not mismatches:
            message = f"{API}: the finite-difference check failed on another process; see its error."
        else:
            message = mismatch_message(API, mismatches, f"on the first {stage_word} batch", hint)
        if self.verify == "error":
            raise SensitivityCheckError(message, mismatches)
        if mismatches:
            warnings.warn(message, UserWarning, stacklevel=2)

    def _on_lost(self, error: SensitivityCheckError, labels: list[str]) -> None:
        """``verify="warn"``: a derivative AD lost is logged as NaN (counted in ``/nonfinite``), with one warning per
        target."""
        if any([self._first(f"lost {label}") for label in labels]):
            warnings.warn(f"{error} Its values are logged as NaN (counted in /nonfinite): verify='warn'.", stacklevel=2)

    def _check_rows(self, trainer: Trainer, batch: Any, sens: dict[str, Tensor]) -> None:
        """Warn once where the default call gave an output whose rows are not the input's samples: most likely a
        ``forward`` that expects the whole batch and indexed into ``batch[0]`` instead."""
        module = trainer.lightning_module
        x = model_input(batch)
        if not isinstance(x, Tensor) or x.dim() == 0 or self._function(module) is not None:
            return
        rows = next(iter(sens.values())).shape[0]
        if rows != x.shape[0] and self._first("rows"):
            name = type(module).__name__
            rank_zero_warn(
                f"{API}: {name}(batch[0]) returned {rows} rows for an input of {x.shape[0]} samples, and the monitor "
                f"counts each row of the output as a sample. If {name}.forward expects the whole batch, or the "
                f"samples are not the first dimension, define `sensitivity_step(self, batch, batch_idx)` on {name} "
                "(or pass `step=` to the monitor) to return the output to differentiate, shaped [samples, ...]."
            )

    def _function(self, module: LightningModule) -> Callable[..., Any] | None:
        """What is differentiated in place of the module's call: the monitor's ``step`` bound to the module (it wins
        over a ``sensitivity_step``), the module's ``sensitivity_step``, or ``None``."""
        if self.step is not None:
            bound = functools.partial(self.step, module)
            bound.__name__ = getattr(self.step, "__name__", "step")  # type: ignore[attr-defined]
            return bound
        step = getattr(module, "sensitivity_step", None)
        return step if callable(step) else None

    def _first(self, what: str) -> bool:
        """Whether ``what`` happens for the first time in this run (for warnings given once)."""
        first = what not in self._warned
        self._warned.add(what)
        return first


def describe(name: str, call: Call) -> str:
    """``Name(Tensor[8, 3], t=Tensor[8])``: a call, with tensors by shape and other arguments by type."""

    def one(value: Any) -> str:
        return f"Tensor{list(value.shape)}" if isinstance(value, Tensor) else type(value).__name__

    args, kwargs = call
    return f"{name}({', '.join([*map(one, args), *(f'{k}={one(v)}' for k, v in kwargs.items())])})"


def _ours(error: BaseException) -> bool:
    """Whether the engine raised ``error`` itself (its messages name the API), not the model."""
    return isinstance(error, SensitivityCheckError) or str(error).startswith(API)


def _in_default_call(error: Exception, name: str, call: Call, the_steps: bool) -> Exception:
    """``error`` from inside the model, in the call the monitor chose, with that call and the way out added."""
    which = "the step's call" if the_steps else "the default call"
    message = (
        f"{API}: {which} {describe(name, call)} failed inside the model: {type(error).__name__}: {error}. If that "
        f"is not how {name} computes the output to differentiate, define `sensitivity_step(self, batch, batch_idx)` "
        f"on {name} to return it, shaped [samples, ...] (for example `return self(batch[0], batch[1])`)."
    )
    try:
        return type(error)(message)
    except Exception:  # noqa: BLE001 - an exception type that takes other arguments
        return RuntimeError(message)


def _check_forward_takes(module: LightningModule, args: tuple[Any, ...]) -> None:
    """A ``TypeError`` that says to define ``sensitivity_step`` when ``forward`` cannot take ``args`` alone."""
    try:
        signature = inspect.signature(module.forward)
    except (TypeError, ValueError):  # no signature to read: let the call tell
        return
    try:
        signature.bind(*args)
    except TypeError as error:
        name = type(module).__name__
        raise TypeError(
            f"{API}: {name}.forward{signature} cannot be called with the batch's first element alone ({error}). "
            f"Define `sensitivity_step(self, batch, batch_idx)` on {name} (or pass `step=` to the monitor) to return "
            "the output to differentiate, shaped [samples, ...] (for example `x, t, y = batch; return self(x, t)`)."
        ) from None


def _takes_dataloader_idx(function: Callable[..., Any]) -> bool:
    """Whether ``function`` (``sensitivity_step``, or the monitor's ``step`` bound to the module) takes
    ``dataloader_idx`` after ``(batch, batch_idx)``, as Lightning tells for ``validation_step``: a third positional
    parameter of any name, or ``*args``."""
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3 or any(p.kind is p.VAR_POSITIONAL for p in parameters)


def _names_input(module: LightningModule, text: str) -> bool:
    """Whether ``text`` names an input in the batch (``batch[...]``) rather than a parameter or buffer."""
    head = text.strip().split("[")[0].strip()
    names = [name for name, _ in (*module.named_parameters(), *module.named_buffers())]
    return is_input(text, ("batch",)) and not any(name.split(".")[0] == head for name in names)
