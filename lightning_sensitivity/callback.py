"""``SensitivityMonitor``: per-sample sensitivities during ordinary Lightning validation."""

from __future__ import annotations

import functools
import inspect
import sys
import warnings
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DistributedSampler

from lightning_sensitivity._aggregate import SensitivityAggregator
from lightning_sensitivity._targets import LazyTargetError, ResolvedTarget, resolve_targets, target_list
from lightning_sensitivity._verify import Mismatch, SensitivityCheckError, mismatch_message
from lightning_sensitivity.functional import Method, check_chunk_size, check_method, compute_sensitivities

Reduction = Literal["none", "sum", "mean", "norm"]
Verify = bool | Literal["error", "warn"]
_REDUCTIONS = ("none", "sum", "mean", "norm")
_VERIFY = (True, False, "error", "warn")
_API = "SensitivityMonitor"
_STATS = ("mean", "std", "abs_mean", "nonfinite")


class SensitivityMonitor(Callback):
    """Log per-sample derivatives of a model's outputs with respect to named scalars, every validation epoch.

    On every validation batch the monitor differentiates the model's output with respect to each target by
    forward-mode AD, on the module's device, and folds the values into on-device statistics (no host sync
    per batch; memory independent of the number of samples). At the end of the validation epoch it writes,
    for each target:

    - a histogram ``sensitivity/<target>`` to TensorBoard, at ``trainer.global_step``, with exact
      num, sum, sum of squares, min and max (non-finite values are left out and counted);
    - scalars ``sensitivity/<target>/mean``, ``/std``, ``/abs_mean`` and ``/nonfinite`` through
      ``pl_module.log``, so every logger and ``trainer.callback_metrics`` receive them.

    What is differentiated: ``pl_module.sensitivity_step(batch, batch_idx)`` when the LightningModule defines
    it (it may also take ``dataloader_idx``); otherwise ``pl_module(batch[0])`` for a tuple or list batch and
    ``pl_module(batch)`` for a tensor batch. The first dimension of the output indexes samples.

    Args:
        targets: parameters or buffers of the LightningModule: ``"C"`` (one element), ``"net.0.weight[3, 1]"``
            (one element of a tensor), or a glob such as ``"blocks.*.alpha"``; one string or a list. Checked in
            ``setup``, before the first training step (targets inside lazy modules, once they are materialised).
        every_n_epochs: run on validation epochs whose ``current_epoch + 1`` is a multiple of this
            (``trainer.validate`` always runs).
        max_batches: at most this many batches of each validation dataloader per epoch; ``None``: all.
        reduction: how the output elements of one sample become values: ``"none"`` keeps every element as a
            value; ``"sum"``, ``"mean"`` and ``"norm"`` (L2) give one value per sample.
        method: ``"auto"`` (forward mode, reverse-mode fallback where an op lacks a forward formula),
            ``"forward"`` or ``"reverse"``; see :func:`~lightning_sensitivity.per_sample_sensitivities`.
        chunk_size: how many targets are pushed through the model at once; ``None``: all.
        verify: on the first batch it differentiates (the sanity check's, or the first validation batch when
            there is none), also compute central finite differences for every target (about two forward passes
            each, once per run) and compare. ``True`` / ``"error"``: raise
            :class:`~lightning_sensitivity.SensitivityCheckError` where they disagree, before the first
            training step; ``"warn"``: warn once and go on; ``False``: no check.
        prefix: the first part of every tag (``<prefix>/<target>``, ``<prefix>/<target>/mean``, ...). Two
            monitors on one Trainer that watch the same target need different prefixes.
        log_sanity_check: also run during the sanity check before training (at ``global_step`` 0).
        dataloaders: indices of the validation dataloaders to use; ``None``: all.
        log_histograms: write the TensorBoard histograms.
        buckets_per_octave: histogram resolution: buckets per factor of two on each side of zero.
        drop_padded_duplicates: under DDP, a ``DistributedSampler`` (Lightning's default for validation) pads
            the data set to a multiple of the world size by repeating its first samples at the end of some
            ranks; leave those repeats out so that every sample counts once. The samples of the model's output
            must then follow the order of the dataloader, as they do for ``pl_module(batch[0])``.

    Raises:
        ValueError: a bad argument, named in the message.

    Example:
        >>> monitor = SensitivityMonitor(targets=["C", "net.0.weight[3, 1]"], every_n_epochs=2)
        >>> monitor.targets, monitor.reduction, monitor.verify
        (['C', 'net.0.weight[3, 1]'], 'none', 'error')
        >>> SensitivityMonitor(targets="C", verify="warn", prefix="sens_c").targets
        ['C']
        >>> SensitivityMonitor(targets=["C"], every_n_epochs=0)
        Traceback (most recent call last):
        ...
        ValueError: SensitivityMonitor(every_n_epochs=...): must be a positive integer; got 0.
    """

    def __init__(
        self,
        targets: str | list[str],
        *,
        every_n_epochs: int = 1,
        max_batches: int | None = None,
        reduction: Reduction = "none",
        method: Method = "auto",
        chunk_size: int | None = None,
        verify: Verify = True,
        prefix: str = "sensitivity",
        log_sanity_check: bool = False,
        dataloaders: list[int] | None = None,
        log_histograms: bool = True,
        buckets_per_octave: int = 8,
        drop_padded_duplicates: bool = True,
    ) -> None:
        targets = target_list(targets, f"{_API}(targets=...)")
        _check_positive("every_n_epochs", every_n_epochs)
        _check_positive("buckets_per_octave", buckets_per_octave)
        if max_batches is not None:
            _check_positive("max_batches", max_batches)
        if reduction not in _REDUCTIONS:
            choices = ", ".join(map(repr, _REDUCTIONS))
            raise ValueError(f"{_API}(reduction=...): must be one of {choices}; got {reduction!r}.")
        check_method(method, f"{_API}(method=...)")
        check_chunk_size(chunk_size, f"{_API}(chunk_size=...)")
        if not any(verify is v for v in (True, False)) and verify not in ("error", "warn"):
            raise ValueError(f"{_API}(verify=...): must be True, False, 'error' or 'warn'; got {verify!r}.")
        if not isinstance(prefix, str) or not prefix.strip("/") or prefix != prefix.strip("/ "):
            raise ValueError(
                f"{_API}(prefix=...): must be a non-empty tag without leading or trailing '/' or spaces, such as "
                f"'sensitivity'; got {prefix!r}."
            )
        if dataloaders is not None and not all(isinstance(i, int) and i >= 0 for i in dataloaders):
            raise ValueError(f"{_API}(dataloaders=...): must be a list of non-negative indices; got {dataloaders!r}.")
        self.targets = targets
        self.every_n_epochs = every_n_epochs
        self.max_batches = max_batches
        self.reduction = reduction
        self.method = method
        self.chunk_size = chunk_size
        #: ``"error"``, ``"warn"`` or ``False``
        self.verify: Literal["error", "warn", False] = "error" if verify is True else verify
        self.prefix = prefix
        self.log_sanity_check = log_sanity_check
        self.dataloaders = None if dataloaders is None else list(dataloaders)
        self.log_histograms = log_histograms
        self.buckets_per_octave = buckets_per_octave
        self.drop_padded_duplicates = drop_padded_duplicates

        self._resolved: list[ResolvedTarget] = []
        self._pending = False  # targets inside lazy modules: resolved at the first batch
        self._aggregator: SensitivityAggregator | None = None
        self._histogram_writer: Any = None
        self._active = False
        self._dry_run = False
        self._verified = False
        self._batches: dict[int, int] = {}
        self._samples: dict[int, int] = {}
        self._originals: dict[int, int] = {}
        self._warned_constant: set[str] = set()
        self.epochs_logged = 0
        """Validation epochs whose statistics were logged, across resumes from checkpoints."""

    @property
    def state_key(self) -> str:
        # Every argument: two monitors differing in any of them keep their own state in a checkpoint.
        return self._generate_state_key(
            targets=self.targets,
            every_n_epochs=self.every_n_epochs,
            max_batches=self.max_batches,
            reduction=self.reduction,
            method=self.method,
            chunk_size=self.chunk_size,
            verify=self.verify,
            prefix=self.prefix,
            log_sanity_check=self.log_sanity_check,
            dataloaders=self.dataloaders,
            log_histograms=self.log_histograms,
            buckets_per_octave=self.buckets_per_octave,
            drop_padded_duplicates=self.drop_padded_duplicates,
        )

    def state_dict(self) -> dict[str, Any]:
        return {"labels": self.labels, "epochs_logged": self.epochs_logged}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epochs_logged = int(state_dict.get("epochs_logged", 0))
        labels = list(state_dict.get("labels", []))
        if self._resolved and labels != self.labels:  # Lightning restores callbacks after `setup`
            rank_zero_warn(
                f"{_API}: the checkpoint was written while watching {labels}, now {self.labels}; the histograms "
                "before and after the resume are of different targets."
            )

    @property
    def labels(self) -> list[str]:
        """Canonical labels of the resolved targets (empty before ``setup``)."""
        return [t.label for t in self._resolved]

    # ---- set-up ------------------------------------------------------------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        try:
            self._resolved, self._pending = resolve_targets(pl_module, self.targets, f"{_API}(targets=...)"), False
        except LazyTargetError:
            self._resolved, self._pending = [], True  # resolved once validation_step has materialised them
        self._aggregator = None  # made at the first validation epoch, on the module's device
        self._verified = False
        self._check_clashes(trainer)
        self._histogram_writer = _histogram_writer(trainer.loggers)
        if self.log_histograms and self._histogram_writer is None:
            rank_zero_warn(
                f"{_API}: the Trainer has no TensorBoardLogger, so no sensitivity histograms are written; the "
                "summary scalars still go to every logger. Add lightning.pytorch.loggers.TensorBoardLogger to "
                "`Trainer(logger=...)`, or pass log_histograms=False to silence this warning."
            )

    def _check_clashes(self, trainer: Trainer) -> None:
        """Refuse a second monitor that would write the same tags (one of the two would be lost)."""
        for other in trainer.callbacks:  # type: ignore[attr-defined]
            if other is self or not isinstance(other, SensitivityMonitor) or other.prefix != self.prefix:
                continue
            shared = [label for label in self.labels if label in other.labels]
            if shared:
                raise ValueError(
                    f"{_API}(prefix={self.prefix!r}): another SensitivityMonitor on this Trainer also watches "
                    f"{shared[0]!r} under the same prefix, so both would write '{self.prefix}/{shared[0]}' at the "
                    f"same steps and one would be lost. Give one of them its own prefix, such as "
                    f"SensitivityMonitor(..., prefix='{self.prefix}_2')."
                )

    def _make_aggregator(self, trainer: Trainer, pl_module: LightningModule) -> SensitivityAggregator:
        if self._aggregator is None:
            dtype = torch.float32 if pl_module.device.type == "mps" else torch.float64  # MPS has no float64
            self._aggregator = SensitivityAggregator(
                len(self._resolved),
                self.buckets_per_octave,
                dtype=dtype,
                # Sync only when this Trainer runs several processes, not over a process group that an earlier
                # run (a DDP fit in the same notebook) left behind.
                distributed_available_fn=functools.partial(_several_processes, trainer),
            )
        self._aggregator.to(pl_module.device)
        return self._aggregator

    # ---- validation --------------------------------------------------------------------------------------

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._active = self._should_run(trainer)
        # Without logging it, the sanity check still differentiates one batch, so that a model whose output
        # cannot be differentiated stops the run before the first training step, not after the first epoch.
        self._dry_run = trainer.sanity_checking and not self._active
        self._batches, self._samples = {}, {}
        self._originals = _original_samples(trainer) if self.drop_padded_duplicates else {}
        if self._active and not self._pending:
            self._start_epoch(trainer, pl_module)

    def _start_epoch(self, trainer: Trainer, pl_module: LightningModule) -> None:
        aggregator = self._make_aggregator(trainer, pl_module)
        aggregator.reset()
        # Mark the metric updated on every rank, so that a rank without a single value of its own (all of its
        # samples repeats of the sampler's padding, say) still joins the collective at epoch end.
        aggregator.update(torch.empty(len(self._resolved), 0, device=pl_module.device))

    def _should_run(self, trainer: Trainer) -> bool:
        if trainer.sanity_checking:
            return self.log_sanity_check
        if trainer.state.fn == "validate":
            return True
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.dataloaders is not None and dataloader_idx not in self.dataloaders:
            return
        if (self._dry_run or self._active) and self._pending:
            self._resolve_lazily(trainer, pl_module)
        if self._dry_run:
            self._dry_run = False
            self._differentiate(trainer, batch, batch_idx, dataloader_idx)
            return
        if not self._active or self._aggregator is None:
            return
        seen = self._batches.get(dataloader_idx, 0)
        if self.max_batches is not None and seen >= self.max_batches:
            return
        self._batches[dataloader_idx] = seen + 1
        sens = self._differentiate(trainer, batch, batch_idx, dataloader_idx)
        first = next(iter(sens.values()))
        keep = first.shape[0]
        if dataloader_idx in self._originals:  # this rank's sampler repeats samples at its end
            seen = self._samples.get(dataloader_idx, 0)
            self._samples[dataloader_idx] = seen + keep
            keep = max(0, min(keep, self._originals[dataloader_idx] - seen))
            if keep == 0:
                return
        values = torch.stack([_reduce(sens[t.label][:keep], self.reduction) for t in self._resolved])
        self._aggregator.update(values)

    def _resolve_lazily(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Targets inside lazy modules, now that ``validation_step`` has run the model once."""
        try:
            self._resolved = resolve_targets(pl_module, self.targets, f"{_API}(targets=...)")
        except LazyTargetError as error:
            raise LazyTargetError(
                f"{error} The monitor resolves such targets after the first validation_step; this one is still "
                "uninitialized then: make sure validation_step runs the module that holds it."
            ) from None
        self._pending = False
        self._check_clashes(trainer)
        if self._active:
            self._start_epoch(trainer, pl_module)

    def _differentiate(self, trainer: Trainer, batch: Any, batch_idx: int, dataloader_idx: int) -> dict[str, Tensor]:
        module = trainer.lightning_module  # never a strategy wrapper
        step = getattr(module, "sensitivity_step", None)
        function = None
        if callable(step):
            function = step
            args: tuple[Any, ...] = (batch, batch_idx)
            if "dataloader_idx" in inspect.signature(step).parameters:
                args = (*args, dataloader_idx)
        elif isinstance(batch, Tensor):
            args = (batch,)
        elif isinstance(batch, (tuple, list)) and len(batch) > 0:
            args = (batch[0],)
        else:
            raise TypeError(
                f"{_API}: cannot tell the model's input in a batch of type {type(batch).__name__}; define "
                f"`sensitivity_step(self, batch, batch_idx)` on {type(module).__name__} to return the output to "
                "differentiate, shaped [samples, ...] (for example `return self(batch['x'])`)."
            )
        if function is None:
            _check_forward_takes(module, args)
        on_check = None
        if self.verify and not self._verified:
            self._verified = True
            on_check = functools.partial(self._on_check, trainer)
        return compute_sensitivities(
            module,
            self._resolved,
            args,
            method=self.method,
            chunk_size=self.chunk_size,
            function=function,
            api=_API,
            on_check=on_check,
        )

    def _on_check(self, trainer: Trainer, mismatches: list[Mismatch]) -> None:
        """The verdict of the finite-difference check on this process's first batch; every process learns
        whether any failed, so that they stop together."""
        failed = trainer.strategy.reduce_boolean_decision(bool(mismatches), all=False)
        if not failed:
            return
        hint = "Pass verify='warn' to log this and go on, or verify=False to skip the check."
        if not mismatches:
            message = f"{_API}: the finite-difference check failed on another process; see its error."
        else:
            message = mismatch_message(_API, mismatches, "on the first validation batch", hint)
        if self.verify == "error":
            raise SensitivityCheckError(message, mismatches)
        if mismatches:
            warnings.warn(message, UserWarning, stacklevel=2)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._active or self._aggregator is None:
            return
        self._active = False
        summary = self._aggregator.compute()  # a collective under DDP: every rank calls it
        for k, target in enumerate(self._resolved):
            for stat in _STATS:
                value = summary[stat].reshape(-1)[k].float()  # torchmetrics squeezes one-element results
                pl_module.log(
                    f"{self.prefix}/{target.label}/{stat}",
                    value,
                    on_step=False,
                    on_epoch=True,
                    # Every rank holds the same, already reduced value: a max over ranks keeps it exactly (a mean
                    # could round) and spares Lightning's warning about unsynced epoch-level values.
                    sync_dist=True,
                    reduce_fx="max",
                    add_dataloader_idx=False,
                )
        self.epochs_logged += 1
        if trainer.is_global_zero:
            self._write_histograms(trainer, summary)

    def _write_histograms(self, trainer: Trainer, summary: dict[str, Tensor]) -> None:
        assert self._aggregator is not None
        histograms = self._aggregator.histograms(summary)  # the one copy to the host per epoch
        for target, hist in zip(self._resolved, histograms, strict=True):
            if hist.num > 0 and hist.min == 0.0 and hist.max == 0.0 and target.label not in self._warned_constant:
                self._warned_constant.add(target.label)
                rank_zero_warn(
                    f"{_API}: every sensitivity to {target.label!r} is zero; the model's output does not seem to "
                    "depend on it (finite differences agree). Check the target name."
                )
            if not self.log_histograms or self._histogram_writer is None or hist.num == 0:
                continue
            self._histogram_writer.add_histogram_raw(
                f"{self.prefix}/{target.label}",
                min=hist.min,
                max=hist.max,
                num=hist.num,
                sum=hist.sum,
                sum_squares=hist.sum_squares,
                bucket_limits=hist.bucket_limits,
                bucket_counts=hist.bucket_counts,
                global_step=trainer.global_step,
            )


def _several_processes(trainer: Trainer) -> bool:
    return trainer.world_size > 1


def _histogram_writer(loggers: list[Logger]) -> Any:
    """The ``SummaryWriter`` of the first TensorBoard logger, of ``lightning.pytorch`` or of the standalone
    ``pytorch_lightning`` package; ``None`` without one."""
    kinds: list[type] = [TensorBoardLogger]
    standalone = sys.modules.get("pytorch_lightning.loggers")
    if standalone is not None:
        kinds.append(standalone.TensorBoardLogger)
    for logger in loggers:
        if isinstance(logger, tuple(kinds)):
            return logger.experiment
    return None


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
            f"{_API}: {name}.forward{signature} cannot be called with the batch's first element alone ({error}). "
            f"Define `sensitivity_step(self, batch, batch_idx)` on {name} to return the output to differentiate, "
            "shaped [samples, ...] (for example `x, t, y = batch; return self(x, t)`)."
        ) from None


def _original_samples(trainer: Trainer) -> dict[int, int]:
    """For each validation dataloader whose ``DistributedSampler`` pads with repeats, how many of this rank's
    samples come before the repeats. The sampler deals positions ``rank, rank + world, ...`` of a list made of
    the data set's indices followed by repeats of its first ones, so the repeats are each rank's last samples.
    """
    loaders = trainer.val_dataloaders
    if loaders is None or trainer.world_size == 1:
        return {}
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    elif not isinstance(loaders, (list, tuple)):
        loaders = [loaders]
    originals = {}
    for idx, loader in enumerate(loaders):
        sampler = getattr(loader, "sampler", None)
        batch_sampler = getattr(loader, "batch_sampler", None)
        if not isinstance(sampler, DistributedSampler):
            sampler = getattr(batch_sampler, "sampler", None)
        if not isinstance(sampler, DistributedSampler) or sampler.drop_last:
            continue
        size = len(sampler.dataset)  # type: ignore[arg-type]
        if sampler.total_size > size:
            originals[idx] = max(0, -(-(size - sampler.rank) // sampler.num_replicas))
    return originals


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{_API}({name}=...): must be a positive integer; got {value!r}.")


def _reduce(sens: Tensor, reduction: str) -> Tensor:
    """``sens [B, *out]`` -> values: ``[B * prod(out)]`` for ``"none"``, else ``[B]``."""
    if reduction == "none":
        return sens.reshape(-1)
    per_sample = sens.reshape(sens.shape[0], -1)
    if reduction == "sum":
        return per_sample.sum(1)
    if reduction == "mean":
        return per_sample.mean(1)
    return torch.linalg.vector_norm(per_sample, dim=1)
