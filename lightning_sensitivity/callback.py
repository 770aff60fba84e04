"""``SensitivityMonitor``: per-sample sensitivities during ordinary Lightning validation."""

from __future__ import annotations

import inspect
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DistributedSampler

from lightning_sensitivity._aggregate import SensitivityAggregator
from lightning_sensitivity._targets import ResolvedTarget, resolve_targets, target_list
from lightning_sensitivity.functional import Method, check_chunk_size, check_method, compute_sensitivities

Reduction = Literal["none", "sum", "mean", "norm"]
_REDUCTIONS = ("none", "sum", "mean", "norm")
_API = "SensitivityMonitor"


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
            (one element of a tensor), or a glob such as ``"blocks.*.alpha"``. Checked in ``setup``, before the
            first training step.
        every_n_epochs: run on validation epochs whose ``current_epoch + 1`` is a multiple of this
            (``trainer.validate`` always runs).
        max_batches: at most this many batches of each validation dataloader per epoch; ``None``: all.
        reduction: how the output elements of one sample become values: ``"none"`` keeps every element as a
            value; ``"sum"``, ``"mean"`` and ``"norm"`` (L2) give one value per sample.
        method: ``"auto"`` (forward mode, reverse-mode fallback where an op lacks a forward formula),
            ``"forward"`` or ``"reverse"``; see :func:`~lightning_sensitivity.per_sample_sensitivities`.
        chunk_size: how many targets are pushed through the model at once; ``None``: all.
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
        >>> monitor.targets, monitor.reduction
        (['C', 'net.0.weight[3, 1]'], 'none')
        >>> SensitivityMonitor(targets=["C"], every_n_epochs=0)
        Traceback (most recent call last):
        ...
        ValueError: SensitivityMonitor(every_n_epochs=...): must be a positive integer; got 0.
    """

    def __init__(
        self,
        targets: list[str],
        *,
        every_n_epochs: int = 1,
        max_batches: int | None = None,
        reduction: Reduction = "none",
        method: Method = "auto",
        chunk_size: int | None = None,
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
        if dataloaders is not None and not all(isinstance(i, int) and i >= 0 for i in dataloaders):
            raise ValueError(f"{_API}(dataloaders=...): must be a list of non-negative indices; got {dataloaders!r}.")
        self.targets = targets
        self.every_n_epochs = every_n_epochs
        self.max_batches = max_batches
        self.reduction = reduction
        self.method = method
        self.chunk_size = chunk_size
        self.log_sanity_check = log_sanity_check
        self.dataloaders = None if dataloaders is None else list(dataloaders)
        self.log_histograms = log_histograms
        self.buckets_per_octave = buckets_per_octave
        self.drop_padded_duplicates = drop_padded_duplicates

        self._resolved: list[ResolvedTarget] = []
        self._aggregator: SensitivityAggregator | None = None
        self._tensorboard: TensorBoardLogger | None = None
        self._active = False
        self._dry_run = False
        self._batches: dict[int, int] = {}
        self._samples: dict[int, int] = {}
        self._originals: dict[int, int] = {}
        self._warned_constant: set[str] = set()
        #: validation epochs whose statistics were logged, across resumes from checkpoints
        self.epochs_logged = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(targets=self.targets, reduction=self.reduction, dataloaders=self.dataloaders)

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
        self._resolved = resolve_targets(pl_module, self.targets, f"{_API}(targets=...)")
        self._aggregator = None  # made at the first validation epoch, on the module's device
        self._tensorboard = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if self.log_histograms and self._tensorboard is None:
            rank_zero_warn(
                f"{_API}: the Trainer has no TensorBoardLogger, so no sensitivity histograms are written; the "
                "summary scalars still go to every logger. Add lightning.pytorch.loggers.TensorBoardLogger to "
                "`Trainer(logger=...)`, or pass log_histograms=False to silence this warning."
            )

    # ---- validation --------------------------------------------------------------------------------------

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._active = self._should_run(trainer)
        # Without logging it, the sanity check still differentiates one batch, so that a model whose output
        # cannot be differentiated stops the run before the first training step, not after the first epoch.
        self._dry_run = trainer.sanity_checking and not self._active
        self._batches, self._samples = {}, {}
        self._originals = _original_samples(trainer) if self.drop_padded_duplicates else {}
        if self._active:
            if self._aggregator is None:
                dtype = torch.float32 if pl_module.device.type == "mps" else torch.float64  # MPS has no float64
                self._aggregator = SensitivityAggregator(len(self._resolved), self.buckets_per_octave, dtype=dtype)
            self._aggregator.to(pl_module.device)
            self._aggregator.reset()
            # Mark the metric updated on every rank, so that a rank without a single value of its own (all of
            # its samples repeats of the sampler's padding, say) still joins the collective at epoch end.
            self._aggregator.update(torch.empty(len(self._resolved), 0, device=pl_module.device))

    def _should_run(self, trainer: Trainer) -> bool:
        if trainer.sanity_checking:
            return self.log_sanity_check
        if trainer.state.fn == TrainerFn.VALIDATING:
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
        if self._dry_run:
            self._dry_run = False
            self._differentiate(trainer.lightning_module, batch, batch_idx, dataloader_idx)
            return
        if not self._active or self._aggregator is None:
            return
        seen = self._batches.get(dataloader_idx, 0)
        if self.max_batches is not None and seen >= self.max_batches:
            return
        self._batches[dataloader_idx] = seen + 1
        module = trainer.lightning_module  # never a strategy wrapper
        sens = self._differentiate(module, batch, batch_idx, dataloader_idx)
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

    def _differentiate(
        self, module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int
    ) -> dict[str, Tensor]:
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
        return compute_sensitivities(
            module, self._resolved, args, method=self.method, chunk_size=self.chunk_size, function=function, api=_API
        )

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._active or self._aggregator is None:
            return
        self._active = False
        summary = self._aggregator.compute()  # a collective under DDP: every rank calls it
        for k, target in enumerate(self._resolved):
            for stat in ("mean", "std", "abs_mean", "nonfinite"):
                value = summary[stat].reshape(-1)[k].float()  # torchmetrics squeezes one-element results
                pl_module.log(
                    f"sensitivity/{target.label}/{stat}",
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
                    "depend on it (or an op drops its derivative). Check the target name."
                )
            if not self.log_histograms or self._tensorboard is None or hist.num == 0:
                continue
            self._tensorboard.experiment.add_histogram_raw(
                f"sensitivity/{target.label}",
                min=hist.min,
                max=hist.max,
                num=hist.num,
                sum=hist.sum,
                sum_squares=hist.sum_squares,
                bucket_limits=hist.bucket_limits,
                bucket_counts=hist.bucket_counts,
                global_step=trainer.global_step,
            )


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
