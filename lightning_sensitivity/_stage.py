"""One stage of the monitor (validate, test or predict) over a Trainer run: which epochs and batches it
differentiates, the epoch's aggregators (``_epoch.py``) fed with each batch's sensitivities, and the report each
logged epoch ends with. The monitor's hooks hand each call to its stage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lightning.pytorch import Trainer

from lightning_sensitivity._batches import Differentiator
from lightning_sensitivity._epoch import EpochRun, check_profile_size
from lightning_sensitivity._report import Report
from lightning_sensitivity._targets import target_values


@dataclass(frozen=True)
class StageSettings:
    """The monitor's arguments a stage reads."""

    monitored: bool  # the stage is in ``stages``
    every_n_epochs: int
    max_batches: int | None
    dataloaders: list[int] | None
    reduction: str
    profile_limit: int | None  # ``max_profile_elements`` where profiles are kept, else ``None``
    buckets_per_octave: int
    drop_padded_duplicates: bool
    log_sanity_check: bool
    noise_std: float | None = None

    @classmethod
    def of(cls, monitor: Any, stage: str) -> StageSettings:
        """The settings of ``stage`` from a ``SensitivityMonitor``'s arguments."""
        return cls(
            monitored=stage in monitor.stages,
            every_n_epochs=monitor.every_n_epochs,
            max_batches=monitor.max_batches,
            dataloaders=monitor.dataloaders,
            reduction=monitor.reduction,
            profile_limit=monitor.max_profile_elements if monitor.profiles_enabled else None,
            buckets_per_octave=monitor.buckets_per_octave,
            drop_padded_duplicates=monitor.drop_padded_duplicates,
            log_sanity_check=monitor.log_sanity_check,
            noise_std=monitor.noise_std,
        )


class StageRun:
    """One stage: :meth:`epoch_start`, :meth:`batch_start`, :meth:`batch_end` and :meth:`epoch_end` are its hooks."""

    def __init__(
        self,
        name: str,
        settings: StageSettings,
        differentiator: Differentiator,
        resolved: Callable[[Trainer], None] = lambda trainer: None,
    ) -> None:
        self.name, self.settings, self.differentiator = name, settings, differentiator
        self.resolved = resolved  # called once targets inside lazy modules are resolved
        self.epoch = EpochRun()

    def _logged(self, trainer: Trainer) -> bool:
        """Whether this epoch's statistics are gathered and logged."""
        s = self.settings
        if not s.monitored:
            return False
        if self.name != "validate" or trainer.state.fn == "validate":
            return True  # test, predict, and trainer.validate: always
        if trainer.sanity_checking:
            return s.log_sanity_check
        return (trainer.current_epoch + 1) % s.every_n_epochs == 0

    def epoch_start(self, trainer: Trainer) -> None:
        epoch = self.epoch
        epoch.active = self._logged(trainer)
        # Without logging it, the sanity check still differentiates one batch, so that a model whose output
        # cannot be differentiated stops the run before the first training step, not after the first epoch.
        epoch.dry_run = self.name == "validate" and self.settings.monitored and trainer.sanity_checking
        epoch.dry_run = epoch.dry_run and not epoch.active
        epoch.begin(trainer, self.name, self.settings.drop_padded_duplicates)
        self._start_aggregators(trainer)

    def _start_aggregators(self, trainer: Trainer) -> None:
        if self.epoch.active and not self.differentiator.pending:
            targets = len(self.differentiator.resolved)
            self.epoch.start(trainer, trainer.lightning_module.device, targets, self.settings.buckets_per_octave)

    def _wanted(self, dataloader_idx: int) -> bool:
        """Whether the next batch of ``dataloader_idx`` is differentiated."""
        epoch, s = self.epoch, self.settings
        return (
            (epoch.dry_run or epoch.active)  # an epoch the stage runs in
            and (s.dataloaders is None or dataloader_idx in s.dataloaders)  # a dataloader it watches
            and (epoch.dry_run or epoch.aggregator is not None or self.differentiator.pending)
            and (epoch.dry_run or s.max_batches is None or epoch.batches.get(dataloader_idx, 0) < s.max_batches)
        )

    def batch_start(self, trainer: Trainer, batch: Any, dataloader_idx: int) -> None:
        self.differentiator.disarm()
        if self._wanted(dataloader_idx):
            self.differentiator.arm(trainer, self.name, batch, self.epoch.dry_run)

    def batch_end(self, trainer: Trainer, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        if not self._wanted(dataloader_idx):
            self.differentiator.disarm()
            return
        if self.differentiator.pending:
            self.differentiator.resolve_late(trainer.lightning_module, batch)
            self.resolved(trainer)
            self._start_aggregators(trainer)
        sens = self.differentiator.differentiate(trainer, self.name, batch, batch_idx, dataloader_idx)
        epoch, limit = self.epoch, self.settings.profile_limit
        first = next(iter(sens.values.values()))
        if epoch.dry_run:
            epoch.dry_run = False
            if limit is not None:
                check_profile_size(len(sens.values), first.shape[1:], limit)
            return
        if epoch.aggregator is None:
            return
        epoch.batches[dataloader_idx] = epoch.batches.get(dataloader_idx, 0) + 1
        keep = epoch.kept(dataloader_idx, batch, first.shape[0])
        labels = self.differentiator.labels
        columns = [sens.values[label][:keep] for label in labels]  # possibly empty: every rank still profiles
        raw = None if sens.raw is sens.values else [sens.raw[label][:keep] for label in labels]
        epoch.add(trainer, columns, self.settings.reduction, dataloader_idx, limit, raw)

    def epoch_end(self, trainer: Trainer) -> Report | None:
        """The epoch's report, where it was logged (collectives under DDP: every rank calls this)."""
        if not self.epoch.active or self.epoch.aggregator is None:
            return None
        d = self.differentiator
        theta = target_values(trainer.lightning_module, d.resolved)  # every rank: sharded values are gathered
        return self.epoch.finish(
            trainer, trainer.global_step, d.labels, self.settings.profile_limit, theta, self.settings.noise_std
        )
