"""``SensitivityMonitor``: per-sample sensitivities during ordinary Lightning validation (and test, predict)."""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from collections.abc import Sequence
from typing import Any, Literal

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch import Tensor

from lightning_sensitivity._epoch import EpochRun, check_profile_size, several_processes
from lightning_sensitivity._figures import FigureWriter, matplotlib_available
from lightning_sensitivity._fused import Call, FusedForward, model_input, taken_over, watching
from lightning_sensitivity._modes import RandomState
from lightning_sensitivity._report import SCALARS, Report, markdown
from lightning_sensitivity._sinks import Sink, find_sinks
from lightning_sensitivity._targets import LazyTargetError, ResolvedTarget, resolve_targets, target_list
from lightning_sensitivity._verify import Mismatch, SensitivityCheckError, mismatch_message
from lightning_sensitivity.functional import (
    Method,
    Normalize,
    check_chunk_size,
    check_method,
    check_normalize,
    choice_pending,
    sensitivities_and_output,
)

Reduction = Literal["none", "sum", "mean", "norm"]
Stage = Literal["validate", "test", "predict"]
Verify = bool | Literal["error", "warn"]
_REDUCTIONS = ("none", "sum", "mean", "norm")
_STAGES = ("validate", "test", "predict")
_STAGE_WORDS = {"validate": "validation", "test": "test", "predict": "predict"}
_API = "SensitivityMonitor"


class SensitivityMonitor(Callback):
    """Log per-sample derivatives of a model's outputs with respect to named scalars, every validation epoch.

    On every validation batch the monitor differentiates the model's output with respect to each target by
    forward-mode AD, on the module's device, and folds the values into on-device statistics (no host sync
    per batch; memory independent of the number of samples). At the end of the validation epoch it writes,
    for each target:

    - a histogram ``sensitivity/<target>`` to TensorBoard, at ``trainer.global_step``, with exact
      num, sum, sum of squares, min and max (non-finite values are left out and counted);
    - scalars ``sensitivity/<target>/mean``, ``/std``, ``/abs_mean``, ``/mean_square`` and ``/nonfinite``,
      and ``sensitivity/collinearity`` for the set of targets, through ``pl_module.log``, so every logger and
      ``trainer.callback_metrics`` receive them;
    - a ranked Markdown table ``sensitivity/summary`` to TensorBoard's text tab and, with matplotlib
      installed, figures ``sensitivity/ranking``, ``sensitivity/correlation`` and ``sensitivity/profile/<target>``
      to its images tab.

    After an epoch, :meth:`summary`, :meth:`correlation` and :meth:`profiles` return its statistics.

    What is differentiated: ``pl_module.sensitivity_step(batch, batch_idx)`` when the LightningModule defines
    it (it may also take ``dataloader_idx``); otherwise ``pl_module(batch[0])`` for a tuple or list batch and
    ``pl_module(batch)`` for a tensor batch. The first dimension of the output indexes samples. Where the step
    itself makes that very call, in eval mode, without grad or autocast, that call gives the sensitivities
    too, so that no second forward pass is needed (see the README).

    Args:
        targets: parameters or buffers of the LightningModule: ``"C"`` (one element), ``"net.0.weight[3, 1]"``
            (one element of a tensor), or a glob such as ``"blocks.*.alpha"``; one string or a list. Checked in
            ``setup``, before the first training step (targets inside lazy modules, once they are materialised).
        every_n_epochs: run on validation epochs whose ``current_epoch + 1`` is a multiple of this
            (``trainer.validate`` always runs).
        max_batches: at most this many batches of each dataloader per epoch; ``None``: all.
        reduction: how the output elements of one sample become values: ``"none"`` keeps every element as a
            value; ``"sum"``, ``"mean"`` and ``"norm"`` (L2) give one value per sample.
        normalize: what is aggregated: ``"none"``: ``dy/dθ``; ``"parameter"``: ``θ · dy/dθ`` (scaled
            sensitivity); ``"relative"``: ``(θ / y) · dy/dθ`` (elasticity; non-finite where ``y`` is 0, and
            counted in ``/nonfinite``). Every statistic, the correlation, the profiles and the ranking are of
            these values; the tags stay the same.
        profiles: also keep, for every output element, the mean and the mean of ``|value|`` over samples (a
            curve over time for a trajectory ``[B, T]``, one value per class for logits ``[B, C]``), per
            dataloader; see :meth:`profiles`. Memory: ``K × prod(out)`` per dataloader.
        max_profile_elements: the largest ``K × prod(out)`` that ``profiles`` may keep; larger is refused on
            the first batch, before the first training step.
        method: ``"auto"`` (forward mode, reverse-mode fallback where an op lacks a forward formula),
            ``"forward"`` or ``"reverse"``; see :func:`~lightning_sensitivity.per_sample_sensitivities`.
        chunk_size: how many targets are pushed through the model at once; ``None``: all.
        verify: on the first batch it differentiates (the sanity check's, or the first batch when there is
            none), also compute central finite differences for every target (about two forward passes each,
            once per run) and compare. ``True`` / ``"error"``: raise
            :class:`~lightning_sensitivity.SensitivityCheckError` where they disagree, before the first
            training step; ``"warn"``: warn once and go on; ``False``: no check. Independently, at every batch,
            a derivative that no AD mode carried while the output moves with its target (checked by finite
            differences) raises :class:`~lightning_sensitivity.SensitivityCheckError` with ``True``,
            ``"error"`` and ``False``; with ``"warn"`` it warns once per target and is logged as NaN (counted
            in ``/nonfinite``). It is never logged as zeros.
        stages: where to run: ``"validate"`` (every validation epoch, tags ``<prefix>/...``), ``"test"``
            (``trainer.test``, tags ``<prefix>_test/...``) and ``"predict"`` (``trainer.predict``, which has no
            logger: read :meth:`summary` after it). ``sensitivity_step`` serves every stage.
        prefix: the first part of every tag (``<prefix>/<target>``, ``<prefix>/<target>/mean``, ...). Two
            monitors on one Trainer that watch the same target in the same stage need different prefixes.
        log_sanity_check: also run during the sanity check before training (at ``global_step`` 0).
        dataloaders: indices of the dataloaders to use; ``None``: all.
        log_histograms: write the TensorBoard histograms.
        log_figures: draw the figures (needs matplotlib: ``pip install "lightning-sensitivity[plots]"``); they
            are drawn in a background thread while training goes on.
        buckets_per_octave: histogram resolution: buckets per factor of two on each side of zero.
        drop_padded_duplicates: under DDP, a ``DistributedSampler`` (Lightning's default for validation) pads
            the data set to a multiple of the world size by repeating its first samples at the end of some
            ranks; leave those repeats out so that every sample counts once. Repeats are counted in samples of
            the sampler (a dataset item of ``DataLoader(batch_size=None)`` is one, however many rows it holds).
            Where a batch holds samples and repeats, the output must have one row per sample, in order, as
            ``pl_module(batch[0])`` has; otherwise (a flattened output, a filter) the epoch ends with a
            ``ValueError`` on every process that says what to do.

    Raises:
        ValueError: a bad argument, named in the message.

    Example:
        >>> monitor = SensitivityMonitor(targets=["C", "net.0.weight[3, 1]"], every_n_epochs=2)
        >>> monitor.targets, monitor.reduction, monitor.verify, monitor.stages
        (['C', 'net.0.weight[3, 1]'], 'none', 'error', ['validate'])
        >>> SensitivityMonitor(targets="C", normalize="relative", profiles=True, stages=["validate", "test"]).prefix
        'sensitivity'
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
        normalize: Normalize = "none",
        profiles: bool = False,
        max_profile_elements: int = 65536,
        method: Method = "auto",
        chunk_size: int | None = None,
        verify: Verify = True,
        stages: Sequence[Stage] = ("validate",),
        prefix: str = "sensitivity",
        log_sanity_check: bool = False,
        dataloaders: list[int] | None = None,
        log_histograms: bool = True,
        log_figures: bool = True,
        buckets_per_octave: int = 8,
        drop_padded_duplicates: bool = True,
    ) -> None:
        targets = target_list(targets, f"{_API}(targets=...)")
        _check_positive("every_n_epochs", every_n_epochs)
        _check_positive("buckets_per_octave", buckets_per_octave)
        _check_positive("max_profile_elements", max_profile_elements)
        if max_batches is not None:
            _check_positive("max_batches", max_batches)
        if reduction not in _REDUCTIONS:
            choices = ", ".join(map(repr, _REDUCTIONS))
            raise ValueError(f"{_API}(reduction=...): must be one of {choices}; got {reduction!r}.")
        check_normalize(normalize, f"{_API}(normalize=...)")
        check_method(method, f"{_API}(method=...)")
        check_chunk_size(chunk_size, f"{_API}(chunk_size=...)")
        if not any(verify is v for v in (True, False)) and verify not in ("error", "warn"):
            raise ValueError(f"{_API}(verify=...): must be True, False, 'error' or 'warn'; got {verify!r}.")
        if isinstance(stages, str):
            stages = [stages]  # type: ignore[list-item]
        if not stages or not all(stage in _STAGES for stage in stages) or len(set(stages)) != len(stages):
            choices = ", ".join(map(repr, _STAGES))
            raise ValueError(f"{_API}(stages=...): must be distinct values among {choices}; got {stages!r}.")
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
        self.normalize = normalize
        self.profiles_enabled = profiles
        """The ``profiles`` argument (the name ``profiles`` is the method that returns them)."""
        self.max_profile_elements = max_profile_elements
        self.method = method
        self.chunk_size = chunk_size
        #: ``"error"``, ``"warn"`` or ``False``
        self.verify: Literal["error", "warn", False] = "error" if verify is True else verify
        self.stages: list[str] = list(stages)
        self.prefix = prefix
        self.log_sanity_check = log_sanity_check
        self.dataloaders = None if dataloaders is None else list(dataloaders)
        self.log_histograms = log_histograms
        self.log_figures = log_figures
        self.buckets_per_octave = buckets_per_octave
        self.drop_padded_duplicates = drop_padded_duplicates

        self._resolved: list[ResolvedTarget] = []
        self._pending = False  # targets inside lazy modules: resolved at the first batch
        self._runs: dict[str, EpochRun] = {stage: EpochRun() for stage in _STAGES}
        self._reports: dict[str, Report] = {}
        self._last_stage: str | None = None
        self._sinks: list[Sink] = []
        self._figures = FigureWriter()
        self._draw = False
        self._verified = False
        self._decided = False  # a batch was differentiated: verification done, the mode chosen
        self._fuse_failed = False  # the engine failed inside the step's own forward call: never again
        self._fused: FusedForward | None = None
        self._owns_fused = False
        self._warned_call = False
        self._verified_before_fused = False
        self._warned_constant: set[str] = set()
        self._warned_lost: set[str] = set()
        self._warned_rows = False
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
            normalize=self.normalize,
            profiles=self.profiles_enabled,
            max_profile_elements=self.max_profile_elements,
            method=self.method,
            chunk_size=self.chunk_size,
            verify=self.verify,
            stages=self.stages,
            prefix=self.prefix,
            log_sanity_check=self.log_sanity_check,
            dataloaders=self.dataloaders,
            log_histograms=self.log_histograms,
            log_figures=self.log_figures,
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

    # ---- what the last epoch found -------------------------------------------------------------------------

    def summary(self, stage: Stage | None = None) -> dict[str, dict[str, float]]:
        """The statistics of the last logged epoch, per target: ``count``, ``nonfinite``, ``mean``, ``std``,
        ``abs_mean`` (μ*), ``mean_square`` (ν, the DGSM measure), ``min``, ``max`` and ``rank`` (1 = largest
        ``abs_mean``), as Python numbers, of the values the monitor aggregates (after ``reduction`` and
        ``normalize``).

        Args:
            stage: ``"validate"``, ``"test"`` or ``"predict"``; ``None``: the stage that ran last.

        Raises:
            RuntimeError: no epoch of that stage has been logged yet.
        """
        return {label: dict(stats) for label, stats in self._report(stage, "summary").stats.items()}

    def correlation(self, stage: Stage | None = None) -> tuple[list[str], Tensor]:
        """The Pearson correlation of the targets' values over the last logged epoch, ``(labels, Tensor[K, K])``
        on the host (float64). Two targets whose correlation is near ±1 cannot be told apart from this data.
        Values where any target is non-finite are left out; NaN for a target whose values do not vary."""
        report = self._report(stage, "correlation")
        return list(report.labels), report.correlation.clone()

    def profiles(self, dataloader_idx: int = 0, stage: Stage | None = None) -> dict[str, dict[str, Tensor]]:
        """Per output element, over the samples of the last logged epoch: ``{label: {"mean": Tensor[*out],
        "abs_mean": Tensor[*out]}}`` on the host (float64), for one dataloader (``profiles=True`` only)."""
        if not self.profiles_enabled:
            raise RuntimeError(f"{_API}.profiles(): profiles are not kept; pass SensitivityMonitor(profiles=True).")
        report = self._report(stage, "profiles")
        if dataloader_idx not in report.profiles:
            raise KeyError(
                f"{_API}.profiles(dataloader_idx={dataloader_idx}): no profile for that dataloader; the last "
                f"epoch has profiles for dataloaders {sorted(report.profiles)}."
            )
        return {label: {k: v.clone() for k, v in p.items()} for label, p in report.profiles[dataloader_idx].items()}

    def _report(self, stage: str | None, api: str) -> Report:
        stage = self._last_stage if stage is None else stage
        if stage not in self._reports:
            raise RuntimeError(
                f"{_API}.{api}(): no {'' if stage is None else repr(stage) + ' '}epoch has been logged yet; "
                "call it after trainer.fit, validate, test or predict has run the monitor (in this process: "
                "with ddp_spawn, ddp_fork or ddp_notebook it runs in processes of their own)."
            )
        return self._reports[stage]

    # ---- set-up ------------------------------------------------------------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        _check_strategy(trainer)
        if _starts_processes_from_this_one(trainer):
            rank_zero_warn(
                f"{_API}: this strategy starts its processes from the script's (ddp_spawn, ddp_fork, "
                "ddp_notebook): the monitor runs in them, on copies of itself, and the monitor object in the "
                "launching process is not updated. The logged scalars, histograms, tables and figures are "
                "right, but summary(), correlation() and profiles() there give nothing from this run (or an "
                "earlier run's numbers). Use strategy='ddp' to read them in the script."
            )
        try:
            self._resolved, self._pending = resolve_targets(pl_module, self.targets, f"{_API}(targets=...)"), False
        except LazyTargetError:
            self._resolved, self._pending = [], True  # resolved once the model has materialised them
        self._runs = {name: EpochRun() for name in _STAGES}  # aggregators are made on the module's device
        self._verified = False
        self._decided = self._fuse_failed = False
        self._check_clashes(trainer)
        self._sinks = find_sinks(trainer.loggers)
        if self.log_histograms and not self._sinks and self._logs(stage):
            rank_zero_warn(
                f"{_API}: the Trainer has no TensorBoard, W&B or MLflow logger, so no sensitivity histograms, "
                "tables or figures are written; the summary scalars still go to every logger. Add "
                "lightning.pytorch.loggers.TensorBoardLogger to `Trainer(logger=...)`, or pass "
                "log_histograms=False to silence this warning."
            )
        self._draw = self.log_figures and bool(self._sinks) and matplotlib_available()
        if self.log_figures and self._sinks and not self._draw and self._logs(stage):
            rank_zero_warn(
                f"{_API}: matplotlib is not installed, so the ranking, correlation and profile figures are not "
                'drawn (the table and the scalars still are). pip install "lightning-sensitivity[plots]" to get '
                "them, or pass log_figures=False to silence this warning."
            )

    def _logs(self, fn: str) -> bool:
        """Whether the Trainer function ``fn`` (``setup``'s ``stage``) will log anything."""
        wanted = {"fit": "validate", "validate": "validate", "test": "test"}.get(fn)
        return wanted in self.stages

    def _check_clashes(self, trainer: Trainer) -> None:
        """Refuse a second monitor that would write the same tags (one of the two would be lost)."""
        for other in trainer.callbacks:  # type: ignore[attr-defined]
            if other is self or not isinstance(other, SensitivityMonitor) or other.prefix != self.prefix:
                continue
            if not set(self.stages) & set(other.stages):
                continue
            shared = [label for label in self.labels if label in other.labels]
            if shared:
                raise ValueError(
                    f"{_API}(prefix={self.prefix!r}): another SensitivityMonitor on this Trainer also watches "
                    f"{shared[0]!r} under the same prefix, so both would write '{self.prefix}/{shared[0]}' at the "
                    f"same steps and one would be lost. Give one of them its own prefix, such as "
                    f"SensitivityMonitor(..., prefix='{self.prefix}_2')."
                )

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._disarm()
        self._figures.close()  # before the loggers close their writers

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._disarm()
        with contextlib.suppress(Exception):  # the run's own exception is the one to report
            self._figures.close()

    # ---- the hooks, per stage --------------------------------------------------------------------------------

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_start("validate", trainer, pl_module)

    def on_validation_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._arm("validate", trainer, batch, dataloader_idx)

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._batch_end("validate", trainer, batch, batch_idx, dataloader_idx)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_end("validate", trainer, pl_module)

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_start("test", trainer, pl_module)

    def on_test_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._arm("test", trainer, batch, dataloader_idx)

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._batch_end("test", trainer, batch, batch_idx, dataloader_idx)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_end("test", trainer, pl_module)

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_start("predict", trainer, pl_module)

    def on_predict_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._arm("predict", trainer, batch, dataloader_idx)

    def on_predict_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._batch_end("predict", trainer, batch, batch_idx, dataloader_idx)

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_end("predict", trainer, pl_module)

    # ---- one epoch -------------------------------------------------------------------------------------------

    def _should_run(self, stage: str, trainer: Trainer) -> bool:
        if stage not in self.stages:
            return False
        if stage != "validate":
            return True
        if trainer.sanity_checking:
            return self.log_sanity_check
        if trainer.state.fn == "validate":
            return True
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def _epoch_start(self, stage: str, trainer: Trainer, pl_module: LightningModule) -> None:
        run = self._runs[stage]
        run.active = self._should_run(stage, trainer)
        # Without logging it, the sanity check still differentiates one batch, so that a model whose output
        # cannot be differentiated stops the run before the first training step, not after the first epoch.
        run.dry_run = stage == "validate" and stage in self.stages and trainer.sanity_checking and not run.active
        run.begin(trainer, stage, self.drop_padded_duplicates)
        if run.active and not self._pending:
            run.start(trainer, pl_module.device, len(self._resolved), self.buckets_per_octave)

    def _arm(self, stage: str, trainer: Trainer, batch: Any, dataloader_idx: int) -> None:
        """Watch the step's calls of the module (``_fused.py``): the first with the batch's input as first argument
        is the call to differentiate, and it computes this batch's sensitivities itself where nothing the step
        sees can change. Under several processes only once the first batch took the decisions that are
        collectives (verification, the mode), so that every process makes them at the same point."""
        self._disarm()
        run = self._runs[stage]
        module = trainer.lightning_module
        x = model_input(batch)
        if not self._wanted(run, dataloader_idx) or x is None or callable(getattr(module, "sensitivity_step", None)):
            return
        if taken_over(module):  # another monitor watches the same calls: read them from its watch
            self._fused, self._owns_fused = watching(module), False
            return
        may_compute = not (self._fuse_failed or self._pending or run.dry_run)
        compute = functools.partial(self._compute, stage, trainer) if may_compute else None
        self._verified_before_fused = self._verified
        self._fused = FusedForward(module, x, compute, functools.partial(self._may_take, trainer))
        self._owns_fused = True

    def _may_take(self, trainer: Trainer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Whether the step's call may compute the sensitivities: under several processes only once the decisions
        that are collectives were taken (after the first batch, and the choice of mode for these inputs)."""
        if not several_processes(trainer):
            return True
        pending = choice_pending(trainer.lightning_module, self._resolved, args, kwargs, method=self.method)
        return self._decided and not pending

    def _compute(
        self, stage: str, trainer: Trainer, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[dict[str, Tensor], Tensor]:
        return sensitivities_and_output(
            trainer.lightning_module, self._resolved, args, kwargs, **self._options(stage, trainer)
        )

    def _options(self, stage: str, trainer: Trainer) -> dict[str, Any]:
        """The engine's arguments for one batch; the first one is also checked against finite differences."""
        on_check = None
        if self.verify and not self._verified:
            self._verified = True
            on_check = functools.partial(self._on_check, trainer, _STAGE_WORDS[stage])
        return {
            "method": self.method,
            "chunk_size": self.chunk_size,
            "api": _API,
            "on_check": on_check,
            "normalize": self.normalize,
            "agree": functools.partial(trainer.strategy.broadcast, src=0) if several_processes(trainer) else None,
            "on_lost": self._on_lost if self.verify == "warn" else None,
        }

    def _on_lost(self, error: SensitivityCheckError, labels: list[str]) -> None:
        """``verify="warn"``: a derivative AD lost is logged as NaN (counted in ``/nonfinite``), with one warning per
        target."""
        new = [label for label in labels if label not in self._warned_lost]
        if new:
            self._warned_lost.update(new)
            warnings.warn(f"{error} Its values are logged as NaN (counted in /nonfinite): verify='warn'.", stacklevel=2)

    def _disarm(self) -> FusedForward | None:
        fused, self._fused = self._fused, None
        if fused is not None and self._owns_fused:
            fused.disarm()
        return fused

    def _wanted(self, run: EpochRun, dataloader_idx: int) -> bool:
        """Whether this stage differentiates the next batch of ``dataloader_idx``."""
        if not (run.dry_run or run.active) or (self.dataloaders is not None and dataloader_idx not in self.dataloaders):
            return False
        if run.dry_run:
            return True
        if run.aggregator is None and not self._pending:
            return False
        return self.max_batches is None or run.batches.get(dataloader_idx, 0) < self.max_batches

    def _batch_end(self, stage: str, trainer: Trainer, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        fused = self._disarm()
        run = self._runs[stage]
        if not self._wanted(run, dataloader_idx):
            return
        if self._pending:
            self._resolve_lazily(run, trainer)
        call = self._step_call(trainer, batch, fused)
        if run.dry_run:
            run.dry_run = False
            sens = self._differentiate(stage, trainer, batch, batch_idx, dataloader_idx, call)
            self._decided = True
            self._check_rows(trainer, batch, sens)
            if self.profiles_enabled:
                check_profile_size(len(self._resolved), next(iter(sens.values())).shape[1:], self.max_profile_elements)
            return
        if run.aggregator is None:
            return
        run.batches[dataloader_idx] = run.batches.get(dataloader_idx, 0) + 1  # below max_batches: see _wanted
        if fused is not None and self._owns_fused and fused.result is not None:
            sens = fused.result
        else:
            if fused is not None and self._owns_fused and fused.failed is not None:
                # Done again here, where errors have always been reported, verification included; and from now
                # on always here.
                self._fuse_failed = True
                self._verified = self._verified_before_fused
            sens = self._differentiate(stage, trainer, batch, batch_idx, dataloader_idx, call)
        self._decided = True
        self._check_rows(trainer, batch, sens)
        keep = run.kept(dataloader_idx, batch, next(iter(sens.values())).shape[0])
        columns = [sens[t.label][:keep] for t in self._resolved]  # possibly empty: every rank still makes a profile
        limit = self.max_profile_elements if self.profiles_enabled else None
        run.add(trainer, columns, self.reduction, dataloader_idx, limit)

    def _resolve_lazily(self, run: EpochRun, trainer: Trainer) -> None:
        """Targets inside lazy modules, now that the model has run once."""
        pl_module = trainer.lightning_module
        try:
            self._resolved = resolve_targets(pl_module, self.targets, f"{_API}(targets=...)")
        except LazyTargetError as error:
            raise LazyTargetError(
                f"{error} The monitor resolves such targets after the first validation_step (test_step, "
                "predict_step); this one is still uninitialized then: make sure that step runs the module that "
                "holds it."
            ) from None
        self._pending = False
        self._check_clashes(trainer)
        if run.active:
            run.start(trainer, pl_module.device, len(self._resolved), self.buckets_per_octave)

    def _step_call(self, trainer: Trainer, batch: Any, fused: FusedForward | None) -> Call | None:
        """The step's first call of the module with the batch's input first, which the monitor differentiates;
        ``None`` where the step made none (then ``pl_module(batch[0])``, with one warning where the step called the
        module otherwise)."""
        if fused is None or fused.call is not None:
            return None if fused is None else fused.call
        if fused.calls and not self._warned_call:
            self._warned_call = True
            name = type(trainer.lightning_module).__name__
            made, default = _describe(name, fused.calls[0]), _describe(name, ((model_input(batch),), {}))
            rank_zero_warn(
                f"{_API}: the step called {made}, never with the batch's input as first argument, so the monitor "
                f"differentiates the default call {default}, at inputs the step did not use. Define "
                f"`sensitivity_step(self, batch, batch_idx)` on {name} to return the output to differentiate, "
                "shaped [samples, ...] (for example the step's own call)."
            )
        return None

    def _differentiate(
        self, stage: str, trainer: Trainer, batch: Any, batch_idx: int, dataloader_idx: int, call: Call | None
    ) -> dict[str, Tensor]:
        module = trainer.lightning_module  # never a strategy wrapper
        step = getattr(module, "sensitivity_step", None)
        function = None
        kwargs: dict[str, Any] = {}
        if callable(step):
            function = step
            args: tuple[Any, ...] = (batch, batch_idx)
            # as Lightning passes it to validation_step: a third parameter of any name, or *args
            if is_param_in_hook_signature(step, "dataloader_idx", min_args=3):
                args = (*args, dataloader_idx)
        elif call is not None:  # the step's own call, with every argument it passed
            args, kwargs = call
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
        if function is None and call is None:
            _check_forward_takes(module, args)
        state = RandomState(module.device)  # the steps after this one draw what they would without the monitor
        try:
            sens, _ = sensitivities_and_output(
                module, self._resolved, args, kwargs, function=function, **self._options(stage, trainer)
            )
        except Exception as error:
            if function is not None or _ours(error):
                raise
            raise _in_default_call(error, type(module).__name__, (args, kwargs), call is not None) from error
        finally:
            state.restore()
        return sens

    def _check_rows(self, trainer: Trainer, batch: Any, sens: dict[str, Tensor]) -> None:
        """Warn once where the default call ``pl_module(batch[0])`` gave an output whose rows are not the input's
        samples: most likely a ``forward`` that expects the whole batch and indexed into ``batch[0]`` instead."""
        module = trainer.lightning_module
        x = model_input(batch)
        if (
            self._warned_rows
            or not isinstance(x, Tensor)
            or x.dim() == 0
            or callable(getattr(module, "sensitivity_step", None))
        ):
            return
        rows = next(iter(sens.values())).shape[0]
        if rows != x.shape[0]:
            self._warned_rows = True
            name = type(module).__name__
            rank_zero_warn(
                f"{_API}: {name}(batch[0]) returned {rows} rows for an input of {x.shape[0]} samples, and the monitor "
                f"counts each row of the output as a sample. If {name}.forward expects the whole batch, or the "
                f"samples are not the first dimension, define `sensitivity_step(self, batch, batch_idx)` on {name} "
                "to return the output to differentiate, shaped [samples, ...]."
            )

    def _on_check(self, trainer: Trainer, stage_word: str, mismatches: list[Mismatch]) -> None:
        """The verdict of the finite-difference check on this process's first batch; every process learns
        whether any failed, so that they stop together."""
        failed = trainer.strategy.reduce_boolean_decision(bool(mismatches), all=False)
        if not failed:
            return
        hint = "Pass verify='warn' to log this and go on, or verify=False to skip the check."
        if not mismatches:
            message = f"{_API}: the finite-difference check failed on another process; see its error."
        else:
            message = mismatch_message(_API, mismatches, f"on the first {stage_word} batch", hint)
        if self.verify == "error":
            raise SensitivityCheckError(message, mismatches)
        if mismatches:
            warnings.warn(message, UserWarning, stacklevel=2)

    def _epoch_end(self, stage: str, trainer: Trainer, pl_module: LightningModule) -> None:
        run = self._runs[stage]
        if not run.active or run.aggregator is None:
            return
        limit = self.max_profile_elements if self.profiles_enabled else None
        report = run.finish(
            trainer, trainer.global_step, self.labels, limit
        )  # collectives under DDP: every rank calls it
        self._reports[stage], self._last_stage = report, stage
        prefix = self._prefix(stage)
        if stage != "predict":  # predict has no logger
            for label in report.labels:
                for stat in SCALARS:
                    self._log(pl_module, f"{prefix}/{label}/{stat}", report.stats[label][stat])
            self._log(pl_module, f"{prefix}/collinearity", report.collinearity)
        if stage == "validate":
            self.epochs_logged += 1
        self._warn_constant(report)
        if not trainer.is_global_zero or stage == "predict":
            return
        table = markdown(report, prefix)
        for sink in self._sinks:
            if self.log_histograms:
                sink.histograms(prefix, report)
            sink.table(f"{prefix}/summary", report, table)
        if self._draw:
            wanted = [(sink.figure, self.log_histograms and sink.histograms_as_figures) for sink in self._sinks]
            self._figures.submit(prefix, report, wanted)

    def _prefix(self, stage: str) -> str:
        return self.prefix if stage == "validate" else f"{self.prefix}_{stage}"

    @staticmethod
    def _log(pl_module: LightningModule, name: str, value: float) -> None:
        pl_module.log(
            name,
            float(value),
            on_step=False,
            on_epoch=True,
            # Every rank holds the same, already reduced value: a max over ranks keeps it exactly (a mean could
            # round) and spares Lightning's warning about unsynced epoch-level values.
            sync_dist=True,
            reduce_fx="max",
            add_dataloader_idx=False,
        )

    def _warn_constant(self, report: Report) -> None:
        for label, hist in zip(report.labels, report.histograms, strict=True):
            if hist.num > 0 and hist.min == 0.0 and hist.max == 0.0 and label not in self._warned_constant:
                self._warned_constant.add(label)
                rank_zero_warn(
                    f"{_API}: every sensitivity to {label!r} is zero; the model's output does not depend on it "
                    "(moving it does not move the output either). Check the target name."
                )


#: Strategies the monitor cannot differentiate through, and why.
_UNSUPPORTED_STRATEGIES = {
    "DeepSpeedStrategy": (
        "ZeRO stage 3 replaces F.linear by an autograd.Function without a forward-mode formula and gathers "
        "parameters in place from hooks of its own, so no tangent can be given to them"
    ),
    "FSDPStrategy": (
        "FSDP1 keeps parameters as flat shards, even outside its wrapped modules' forward, which the engine "
        "cannot give a tangent to (and Lightning runs it on CUDA only)"
    ),
}


def _check_strategy(trainer: Trainer) -> None:
    """A ``ValueError`` in ``setup`` for a strategy the monitor cannot support."""
    for cls in type(trainer.strategy).__mro__:
        reason = _UNSUPPORTED_STRATEGIES.get(cls.__name__)
        if reason is not None:
            raise ValueError(
                f"{_API}: the strategy {cls.__name__} is not supported: {reason}. Shard the model with "
                "ModelParallelStrategy and torch.distributed.fsdp.fully_shard (FSDP2) in configure_model, which "
                "the monitor supports, or use strategy='ddp'."
            )


def _starts_processes_from_this_one(trainer: Trainer) -> bool:
    """Whether the Trainer runs in processes that its launcher starts from the script's process by
    multiprocessing (spawn, fork), where the callbacks are copies."""
    launcher = getattr(trainer.strategy, "launcher", None)
    return any(cls.__name__ == "_MultiProcessingLauncher" for cls in type(launcher).__mro__)


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


def _describe(name: str, call: Call) -> str:
    """``Name(Tensor[8, 3], t=Tensor[8])``: a call, with tensors by shape and other arguments by type."""

    def one(value: Any) -> str:
        return f"Tensor{list(value.shape)}" if isinstance(value, Tensor) else type(value).__name__

    args, kwargs = call
    return f"{name}({', '.join([*map(one, args), *(f'{k}={one(v)}' for k, v in kwargs.items())])})"


def _ours(error: BaseException) -> bool:
    """Whether the engine raised ``error`` itself (its messages name the API), not the model."""
    return isinstance(error, SensitivityCheckError) or str(error).startswith(_API)


def _in_default_call(error: Exception, name: str, call: Call, the_steps: bool) -> Exception:
    """``error`` from inside the model, in the call the monitor chose, with that call and the way out added."""
    which = "the step's call" if the_steps else "the default call"
    message = (
        f"{_API}: {which} {_describe(name, call)} failed inside the model: {type(error).__name__}: {error}. If that "
        f"is not how {name} computes the output to differentiate, define `sensitivity_step(self, batch, batch_idx)` "
        f"on {name} to return it, shaped [samples, ...] (for example `return self(batch[0], batch[1])`)."
    )
    try:
        return type(error)(message)
    except Exception:  # noqa: BLE001 - an exception type that takes other arguments
        return RuntimeError(message)


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{_API}({name}=...): must be a positive integer; got {value!r}.")
