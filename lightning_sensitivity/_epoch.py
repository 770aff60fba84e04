"""One stage's epoch for the monitor (validate, test or predict): its on-device aggregators, which samples of
each dataloader count, and the :class:`~lightning_sensitivity._report.Report` it ends with.

Shapes, with ``K`` targets and a batch of ``B`` samples: ``sens[label] [B, *out]`` ->
``values [K, B * prod(out)]`` (``reduction="none"``) or ``[K, B]`` -> ``SensitivityAggregator``;
``[K, B, *out]`` -> one ``ProfileAggregator`` per dataloader.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DistributedSampler

from lightning_sensitivity._aggregate import ProfileAggregator, SensitivityAggregator
from lightning_sensitivity._report import Report, build_report

_LOADERS = {"validate": "val_dataloaders", "test": "test_dataloaders", "predict": "predict_dataloaders"}


@dataclass
class EpochRun:
    """The state of one stage over its current epoch.

    Attributes:
        active: statistics are gathered this epoch.
        dry_run: differentiate the next batch without gathering it (the sanity check).
        batches: batches seen per dataloader.
    """

    aggregator: SensitivityAggregator | None = None
    profiles: dict[int, ProfileAggregator] = field(default_factory=dict)
    active: bool = False
    dry_run: bool = False
    batches: dict[int, int] = field(default_factory=dict)
    samples: dict[int, int] = field(default_factory=dict)
    originals: dict[int, int] = field(default_factory=dict)

    def begin(self, trainer: Any, stage: str, drop_padded_duplicates: bool) -> None:
        """A new epoch of ``stage``: counters reset, and which samples of each dataloader are padding."""
        self.batches, self.samples = {}, {}
        self.originals = original_samples(trainer, stage) if drop_padded_duplicates else {}

    def start(self, trainer: Any, device: torch.device, num_targets: int, buckets_per_octave: int) -> None:
        """Make (once) and reset the aggregators on ``device``."""
        dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        if self.aggregator is None:
            self.aggregator = SensitivityAggregator(
                num_targets,
                buckets_per_octave,
                dtype=dtype,
                # Sync only when this Trainer runs several processes, not over a process group that an earlier
                # run (a DDP fit in the same notebook) left behind.
                distributed_available_fn=functools.partial(several_processes, trainer),
            )
        for metric in (self.aggregator, *self.profiles.values()):
            metric.to(device)
            metric.reset()
        # Mark the metrics updated on every rank, so that a rank without a single value of its own (all of its
        # samples repeats of the sampler's padding, say) still joins the collectives at epoch end.
        self.aggregator.update(torch.empty(num_targets, 0, device=device))
        for profile in self.profiles.values():
            profile.update(torch.empty(num_targets, 0, *profile.shape, device=device))

    def kept(self, dataloader_idx: int, batch_size: int) -> int:
        """How many of this batch's samples count: under DDP the sampler's repeats at a rank's end do not."""
        if dataloader_idx not in self.originals:
            return batch_size
        seen = self.samples.get(dataloader_idx, 0)
        self.samples[dataloader_idx] = seen + batch_size
        return max(0, min(batch_size, self.originals[dataloader_idx] - seen))

    def add(
        self,
        trainer: Any,
        columns: Sequence[Tensor],
        reduction: str,
        dataloader_idx: int,
        profile_limit: int | None,
    ) -> None:
        """Fold one batch in: ``columns`` are the targets' sensitivities ``[B, *out]``, in target order;
        ``profile_limit`` is ``max_profile_elements`` when profiles are kept, else ``None``."""
        assert self.aggregator is not None
        if columns[0].shape[0] > 0:
            self.aggregator.update(torch.stack([reduce_values(column, reduction) for column in columns]))
        if profile_limit is not None:
            self._profile(trainer, columns[0].shape[1:], dataloader_idx, profile_limit).update(
                torch.stack(list(columns))
            )

    def _profile(self, trainer: Any, shape: Sequence[int], dataloader_idx: int, limit: int) -> ProfileAggregator:
        """The profile aggregator of one dataloader, made at its first batch, when the output's shape is known."""
        assert self.aggregator is not None
        profile = self.profiles.get(dataloader_idx)
        if profile is None:
            check_profile_size(self.aggregator.num_targets, shape, limit)
            profile = ProfileAggregator(
                self.aggregator.num_targets,
                tuple(shape),
                dtype=self.aggregator.sum.dtype,
                distributed_available_fn=functools.partial(several_processes, trainer),
            ).to(self.aggregator.sum.device)
            # updated, even if with nothing, so that every rank joins the sync at epoch end
            profile.update(torch.empty(profile.num_targets, 0, *profile.shape, device=self.aggregator.sum.device))
            self.profiles[dataloader_idx] = profile
        elif profile.shape != tuple(shape):
            raise ValueError(
                f"SensitivityMonitor(profiles=True): dataloader {dataloader_idx} gave outputs of shape "
                f"{tuple(shape)} per sample after {profile.shape}; profiles need one shape per dataloader. Pad the "
                "outputs to one length in sensitivity_step, or pass profiles=False."
            )
        return profile

    def finish(self, trainer: Any, step: int, labels: Sequence[str], profile_limit: int | None) -> Report:
        """The epoch's statistics, reduced over every process (collectives under DDP: every rank calls this)
        and copied to the host once."""
        assert self.aggregator is not None
        self.active = False
        if profile_limit is not None and several_processes(trainer):
            self._agree_on_profiles(trainer, profile_limit)
        state = {name: value.cpu() for name, value in self.aggregator.compute().items()}
        profiles = {idx: self.profiles[idx].profiles() for idx in sorted(self.profiles)}
        return build_report(step, labels, state, self.aggregator.histograms(state), profiles)

    def _agree_on_profiles(self, trainer: Any, limit: int) -> None:
        """Every process makes the profile of every dataloader that any process saw (a process may have seen no
        batch of one), so that they all join the same collectives."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        shapes = {idx: profile.shape for idx, profile in self.profiles.items()}
        gathered: list[dict[int, tuple[int, ...]]] = [{} for _ in range(dist.get_world_size())]
        dist.all_gather_object(gathered, shapes)
        for other in gathered:
            for idx, shape in other.items():
                self._profile(trainer, shape, idx, limit)


def check_profile_size(num_targets: int, shape: Sequence[int], limit: int) -> None:
    """A ``ValueError`` when ``K × prod(out)`` profile elements exceed ``limit``."""
    elements = num_targets * math.prod(shape)
    if elements > limit:
        raise ValueError(
            f"SensitivityMonitor(profiles=True): {num_targets} targets × an output of shape {tuple(shape)} per "
            f"sample = {elements} profile elements, more than max_profile_elements={limit}. Raise "
            "max_profile_elements (memory grows with it), watch fewer targets, or return a smaller output from "
            "sensitivity_step."
        )


def several_processes(trainer: Any) -> bool:
    return bool(trainer.world_size > 1)


def original_samples(trainer: Any, stage: str) -> dict[int, int]:
    """For each dataloader of ``stage`` whose ``DistributedSampler`` pads with repeats, how many of this rank's
    samples come before the repeats. The sampler deals positions ``rank, rank + world, ...`` of a list made of
    the data set's indices followed by repeats of its first ones, so the repeats are each rank's last samples.
    """
    loaders = getattr(trainer, _LOADERS[stage], None)
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


def reduce_values(sens: Tensor, reduction: str) -> Tensor:
    """``sens [B, *out]`` -> values: ``[B * prod(out)]`` for ``"none"``, else ``[B]``."""
    if reduction == "none":
        return sens.reshape(-1)
    per_sample = sens.reshape(sens.shape[0], -1)
    if reduction == "sum":
        return per_sample.sum(1)
    if reduction == "mean":
        return per_sample.mean(1)
    norm: Tensor = torch.linalg.vector_norm(per_sample, dim=1)
    return norm
