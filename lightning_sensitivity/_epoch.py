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
from torch.utils._pytree import tree_flatten
from torch.utils.data import BatchSampler, DistributedSampler

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
    #: per padded dataloader: the sampler's samples that this rank's batches so far held
    samples: dict[int, int] = field(default_factory=dict)
    padding: dict[int, Padding] = field(default_factory=dict)
    #: why this rank could not leave the repeats out of a batch (raised on every rank at the epoch's end)
    unknown_repeats: str | None = None

    def begin(self, trainer: Any, stage: str, drop_padded_duplicates: bool) -> None:
        """A new epoch of ``stage``: counters reset, and which samples of each dataloader are padding."""
        self.batches, self.samples, self.unknown_repeats = {}, {}, None
        self.padding = padded_dataloaders(trainer, stage) if drop_padded_duplicates else {}

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
        self.aggregator.to(device)
        self.aggregator.reset()
        # Mark the metric updated on every rank, so that a rank without a single value of its own (all of its
        # samples repeats of the sampler's padding, say) still joins the collectives at epoch end.
        self.aggregator.update(torch.empty(num_targets, 0, device=device))
        # Profiles are made at each dataloader's first batch: an epoch reports those of the dataloaders it ran
        # (with reload_dataloaders_every_n_epochs, not those of an earlier epoch, which would read as NaN).
        self.profiles = {}

    def kept(self, dataloader_idx: int, batch: Any, rows: int) -> int:
        """How many of the ``rows`` differentiated for ``batch`` count: under DDP, none of the sampler's repeats
        at a rank's end. Where a batch holds both samples and repeats, the rows must be its samples (one row per
        sample, in order) to tell them apart; otherwise no row is kept and :meth:`finish` raises."""
        padding = self.padding.get(dataloader_idx)
        if padding is None:
            return rows
        seen = self.samples.get(dataloader_idx, 0)
        size = padding.batch_samples(batch, seen)
        self.samples[dataloader_idx] = seen + (size or 0)
        if size is None:
            if seen < padding.originals:  # the repeats come last: until then, this batch may hold them
                self.unknown_repeats = (
                    f"dataloader {dataloader_idx}'s batches do not show how many samples each holds (no tensor in "
                    "the batch, and not a plain BatchSampler), so the monitor cannot tell which of them are the "
                    "sampler's repeats"
                )
            return 0
        real = max(0, min(size, padding.originals - seen))
        if real == size:
            return rows
        if real == 0 or rows == 0:
            return 0
        if rows == size:
            return real
        self.unknown_repeats = (
            f"a batch of dataloader {dataloader_idx} holds {real} of this process's samples and {size - real} "
            f"added by the DistributedSampler as padding (repeats of other samples), but {rows} rows were "
            "differentiated for it, so the monitor cannot tell which rows are the repeats"
        )
        return 0

    def add(
        self,
        trainer: Any,
        columns: Sequence[Tensor],
        reduction: str,
        dataloader_idx: int,
        profile_limit: int | None,
        raw: Sequence[Tensor] | None = None,
    ) -> None:
        """Fold one batch in: ``columns`` are the targets' sensitivities ``[B, *out]``, in target order, and
        ``raw`` the same before normalisation (``None``: not normalised); ``profile_limit`` is
        ``max_profile_elements`` when profiles are kept, else ``None``."""
        assert self.aggregator is not None
        if columns[0].shape[0] > 0:
            values = torch.stack([reduce_values(column, reduction) for column in columns])
            unscaled = None if raw is None else torch.stack([reduce_values(column, reduction) for column in raw])
            self.aggregator.update(values, unscaled)
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

    def finish(
        self,
        trainer: Any,
        step: int,
        labels: Sequence[str],
        profile_limit: int | None,
        theta: Tensor | None = None,
        noise_std: float | None = None,
    ) -> Report:
        """The epoch's statistics, reduced over every process (collectives under DDP: every rank calls this)
        and copied to the host once."""
        assert self.aggregator is not None
        self.active = False
        # the same dataloaders are padded on every process: all of them join this collective, or none
        if self.padding and trainer.strategy.reduce_boolean_decision(self.unknown_repeats is not None, all=False):
            why = self.unknown_repeats or "another process could not tell which samples are the sampler's repeats"
            raise ValueError(
                f"SensitivityMonitor(drop_padded_duplicates=True): {why}. "
                "Return one row per sample from sensitivity_step (shape [samples, ...]: keep the sample dimension "
                "first, not flattened, and keep every sample), make the data set's size a multiple of the number "
                "of processes, or pass drop_padded_duplicates=False to count the repeats."
            )
        if profile_limit is not None and several_processes(trainer):
            self._agree_on_profiles(trainer, profile_limit)
        state = {name: value.cpu() for name, value in self.aggregator.compute().items()}
        profiles = {idx: self.profiles[idx].profiles() for idx in sorted(self.profiles)}
        return build_report(step, labels, state, self.aggregator.histograms(state), profiles, theta, noise_std)

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


@dataclass(frozen=True)
class Padding:
    """A dataloader whose ``DistributedSampler`` pads with repeats: this rank gets ``total`` samples, of which the
    first ``originals`` are its share of the data set; ``per_batch`` samples a batch (the last one fewer), or
    ``None`` where only the batch itself tells."""

    originals: int
    total: int
    per_batch: int | None

    def batch_samples(self, batch: Any, seen: int) -> int | None:
        """How many of the sampler's samples ``batch`` holds, after ``seen`` of them; ``None``: cannot tell."""
        if self.per_batch is not None:
            return max(0, min(self.per_batch, self.total - seen))
        leaves, _ = tree_flatten(batch)
        return next((leaf.shape[0] for leaf in leaves if isinstance(leaf, Tensor) and leaf.dim() > 0), None)


def padded_dataloaders(trainer: Any, stage: str) -> dict[int, Padding]:
    """Each dataloader of ``stage`` whose ``DistributedSampler`` pads with repeats, by index. The sampler deals
    positions ``rank, rank + world, ...`` of a list made of the data set's indices followed by repeats of its
    first ones, so the repeats are each rank's last samples.

    A batch is counted in samples of the sampler, not in rows of the output: a plain ``BatchSampler`` takes
    ``batch_size`` of them a batch, a dataloader without automatic batching (``batch_size=None``) one (an item
    that may itself be a batch), and any other batch sampler as many as the first dimension of the batch's
    first tensor."""
    loaders = getattr(trainer, _LOADERS[stage], None)
    if loaders is None or trainer.world_size == 1:
        return {}
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    elif not isinstance(loaders, (list, tuple)):
        loaders = [loaders]
    padded = {}
    for idx, loader in enumerate(loaders):
        sampler = getattr(loader, "sampler", None)
        batch_sampler = getattr(loader, "batch_sampler", None)
        if not isinstance(sampler, DistributedSampler):
            sampler = getattr(batch_sampler, "sampler", None)
        if not isinstance(sampler, DistributedSampler) or sampler.drop_last:
            continue
        size = len(sampler.dataset)  # type: ignore[arg-type]
        if sampler.total_size <= size:
            continue
        per_batch: int | None = None
        if batch_sampler is None:
            per_batch = 1
        elif type(batch_sampler) is BatchSampler:
            per_batch = batch_sampler.batch_size
        originals = max(0, -(-(size - sampler.rank) // sampler.num_replicas))
        padded[idx] = Padding(originals, sampler.num_samples, per_batch)
    return padded


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
