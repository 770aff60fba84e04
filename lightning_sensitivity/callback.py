"""``SensitivityMonitor``: per-sample sensitivities during ordinary Lightning validation (and test, predict).

The class is configuration and one-line hooks. Each stage's epochs and batches are a
:class:`~lightning_sensitivity._stage.StageRun`; how a batch is differentiated is the
:class:`~lightning_sensitivity._batches.Differentiator`'s; where a report goes, the
:class:`~lightning_sensitivity._publish.Publisher`'s.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Literal

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

import lightning_sensitivity._arguments as _arguments
from lightning_sensitivity._batches import API, Differentiator
from lightning_sensitivity._engine import Method, Normalize
from lightning_sensitivity._identify import covariance
from lightning_sensitivity._publish import Publisher
from lightning_sensitivity._report import Report
from lightning_sensitivity._stage import StageRun, StageSettings
from lightning_sensitivity._targets import target_list

Reduction = Literal["none", "sum", "mean", "norm"]
#: Arguments kept under another attribute name.
_ATTRIBUTES = {"profiles": "profiles_enabled"}
Stage = Literal["validate", "test", "predict"]
Verify = bool | Literal["error", "warn"]


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
      installed, figures ``sensitivity/ranking``, ``sensitivity/correlation`` and ``sensitivity/profiles``
      to its images tab.

    After an epoch, :meth:`summary`, :meth:`correlation` and :meth:`profiles` return its statistics (also on a
    deep copy of the monitor, as libraries that copy their callbacks hold: copies share their results).

    What is differentiated: ``step(pl_module, batch, batch_idx)`` when the monitor is given one, else
    ``pl_module.sensitivity_step(batch, batch_idx)`` when the LightningModule defines it (both may also take
    ``dataloader_idx``); otherwise the step's own call of the module with the batch's input
    first, ``pl_module(batch[0])`` for a tuple or list batch and ``pl_module(batch)`` for a tensor batch, with
    every other argument the step passed (``self(t, y0)``). The first dimension of the output indexes samples.
    Where the step makes that call in eval mode, without grad or autocast, the call gives the sensitivities too,
    so that no second forward pass is needed (see the docs' page on the take-over).

    Args:
        targets: parameters or buffers of the LightningModule: ``"C"`` (one element), ``"net.0.weight[3, 1]"``
            (one element of a tensor), ``"net.0.weight[...]"`` or ``"net.0.weight[3, :]"`` (every element, a
            slice: one target per element), or a glob such as ``"blocks.*.alpha"``; one string or a list.
            Checked in ``setup``, before the first training step (targets inside lazy modules, once they are
            materialised).
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
        log_figures: draw the figures (needs matplotlib: ``pip install "lightning-sensitivity[plots]"``), in a
            background thread while training goes on: ``True`` at every logged epoch, an integer ``n`` at every
            ``n``-th logged epoch of a stage (the first included), ``False`` (or 0) never.
        buckets_per_octave: histogram resolution: buckets per factor of two on each side of zero.
        drop_padded_duplicates: under DDP, a ``DistributedSampler`` (Lightning's default for validation) pads
            the data set to a multiple of the world size by repeating its first samples at the end of some
            ranks; leave those repeats out so that every sample counts once. Repeats are counted in samples of
            the sampler (a dataset item of ``DataLoader(batch_size=None)`` is one, however many rows it holds).
            Where a batch holds samples and repeats, the output must have one row per sample, in order, as
            ``pl_module(batch[0])`` has; otherwise (a flattened output, a filter) the epoch ends with a
            ``ValueError`` on every process that says what to do.
        noise_std: the standard deviation σ of the observation noise on each aggregated value (each output
            element with ``reduction="none"``), in the output's units. With it, :meth:`summary` gives each
            target's standard error (``stderr``), the scalar ``<prefix>/<target>/stderr`` is logged, and
            :meth:`fisher` and :meth:`covariance` are scaled by ``1/σ²`` and ``σ²``.
        step: what to differentiate, for a module you did not write (or a second output of one you did):
            ``step(pl_module, batch, batch_idx)`` (or ``..., dataloader_idx)``) returns the output, shaped
            ``[samples, ...]``, as ``sensitivity_step`` would; it wins over a ``sensitivity_step``. A callable
            or its import path (``"my_package.steps.forces"``, also from YAML); two monitors with different
            steps and prefixes watch two outputs of one model.

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
        log_figures: bool | int = True,
        buckets_per_octave: int = 8,
        drop_padded_duplicates: bool = True,
        noise_std: float | None = None,
        step: Callable[..., Any] | str | None = None,
    ) -> None:
        def api(name: str) -> str:
            return f"{API}({name}=...)"

        self.targets = target_list(targets, api("targets"))
        for name, value in [("every_n_epochs", every_n_epochs), ("buckets_per_octave", buckets_per_octave)]:
            _arguments.positive(value, api(name))
        _arguments.positive(max_profile_elements, api("max_profile_elements"))
        _arguments.positive(max_batches, api("max_batches"), optional=True)
        _arguments.positive(chunk_size, api("chunk_size"), optional=True)
        _arguments.one_of(reduction, _arguments.REDUCTIONS, api("reduction"))
        _arguments.one_of(normalize, _arguments.NORMALIZATIONS, api("normalize"))
        _arguments.one_of(method, _arguments.METHODS, api("method"))
        _arguments.verify_value(verify, api("verify"))
        _arguments.tag_prefix(prefix, api("prefix"))
        _arguments.indices(dataloaders, api("dataloaders"))
        if noise_std is not None and not (isinstance(noise_std, (int, float)) and 0 < noise_std < math.inf):
            raise ValueError(f"{api('noise_std')}: must be a positive number or None; got {noise_std!r}.")
        if not (isinstance(log_figures, bool) or (isinstance(log_figures, int) and log_figures >= 0)):
            raise ValueError(f"{api('log_figures')}: must be True, False or a number of epochs; got {log_figures!r}.")
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
        self.stages: list[str] = _arguments.stage_list(stages, api("stages"))
        self.prefix = prefix
        self.log_sanity_check = log_sanity_check
        self.dataloaders = None if dataloaders is None else list(dataloaders)
        self.log_histograms = log_histograms
        self.log_figures = log_figures
        self.buckets_per_octave = buckets_per_octave
        self.drop_padded_duplicates = drop_padded_duplicates
        self.noise_std = None if noise_std is None else float(noise_std)
        """The ``noise_std`` argument, as a float (``None``: not given)."""
        self.step: Callable[..., Any] | None = _arguments.step_function(step, api("step"))
        """The ``step`` argument, as a callable (an import path is imported)."""
        self.epochs_logged = 0
        """Validation epochs whose statistics were logged, across resumes from checkpoints."""
        self._results = _Results()
        self._differentiator = self._new_differentiator()
        self._stages: dict[str, StageRun] = {}
        self._publisher: Publisher | None = None

    def _new_differentiator(self) -> Differentiator:
        return Differentiator(self.targets, self.method, self.chunk_size, self.normalize, self.verify, self.step)

    def __deepcopy__(self, memo: dict[int, Any]) -> SensitivityMonitor:
        """A copy that shares this monitor's results: a library that copies its callbacks (neuralforecast) runs the
        copy, and the monitor the user holds reports what it found."""
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        for name, value in self.__dict__.items():
            clone.__dict__[name] = value if name == "_results" else copy.deepcopy(value, memo)
        return clone

    @property
    def state_key(self) -> str:
        # Every argument, in the signature's order: monitors differing in any keep their own state in a checkpoint.
        names = [name for name in inspect.signature(SensitivityMonitor.__init__).parameters if name != "self"]
        values = {name: getattr(self, _ATTRIBUTES.get(name, name)) for name in names}
        values["step"] = _arguments.import_path(self.step)  # not the function's repr, which holds its address
        return self._generate_state_key(**values)

    def state_dict(self) -> dict[str, Any]:
        return {"labels": self.labels, "epochs_logged": self.epochs_logged}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epochs_logged = int(state_dict.get("epochs_logged", 0))
        labels = list(state_dict.get("labels", []))
        if self.labels and labels != self.labels:  # Lightning restores callbacks after `setup`
            rank_zero_warn(
                f"{API}: the checkpoint was written while watching {labels}, now {self.labels}; the histograms "
                "before and after the resume are of different targets."
            )

    @property
    def labels(self) -> list[str]:
        """Canonical labels of the resolved targets (empty before ``setup``)."""
        return self._differentiator.labels

    # ---- what the last epoch found -------------------------------------------------------------------------

    def summary(self, stage: Stage | None = None) -> dict[str, dict[str, float]]:
        """The statistics of the last logged epoch, per target: ``count``, ``nonfinite``, ``mean``, ``std``,
        ``abs_mean`` (μ*), ``mean_square`` (ν, the DGSM measure), ``min``, ``max`` and ``rank`` (1 = largest
        ``abs_mean``), as Python numbers, of the values the monitor aggregates (after ``reduction`` and
        ``normalize``), and ``stderr``, the standard error of the target estimated from this data
        (:meth:`covariance`; NaN without ``noise_std``).

        Args:
            stage: ``"validate"``, ``"test"`` or ``"predict"``; ``None``: the stage that ran last.

        Raises:
            RuntimeError: no epoch of that stage has been logged yet.
        """
        return {label: dict(stats) for label, stats in self._results.report(stage, "summary").stats.items()}

    def correlation(self, stage: Stage | None = None) -> tuple[list[str], Tensor]:
        """The Pearson correlation of the targets' values over the last logged epoch, ``(labels, Tensor[K, K])``
        on the host (float64). Two targets whose correlation is near ±1 cannot be told apart from this data.
        Values where any target is non-finite are left out; NaN in the row and column of a target whose values
        do not vary."""
        report = self._results.report(stage, "correlation")
        return list(report.labels), report.correlation.clone()

    def profiles(self, dataloader_idx: int = 0, stage: Stage | None = None) -> dict[str, dict[str, Tensor]]:
        """Per output element, over the samples of the last logged epoch: ``{label: {"mean": Tensor[*out],
        "abs_mean": Tensor[*out]}}`` on the host (float64), for one dataloader (``profiles=True`` only)."""
        if not self.profiles_enabled:
            raise RuntimeError(f"{API}.profiles(): profiles are not kept; pass SensitivityMonitor(profiles=True).")
        report = self._results.report(stage, "profiles")
        if dataloader_idx not in report.profiles:
            raise KeyError(
                f"{API}.profiles(dataloader_idx={dataloader_idx}): no profile for that dataloader; the last "
                f"epoch has profiles for dataloaders {sorted(report.profiles)}."
            )
        return {label: {k: v.clone() for k, v in p.items()} for label, p in report.profiles[dataloader_idx].items()}

    def fisher(
        self, stage: Stage | None = None, noise_std: float | None = None, *, targets: list[str] | None = None
    ) -> tuple[list[str], Tensor]:
        """The Fisher information of the last logged epoch, ``(labels, Tensor[K, K])`` on the host (float64):
        ``F = Σ s sᵀ / σ²`` over every aggregated value where all targets are finite, ``s`` the raw ``dy/dθ``
        (in θ's units, whatever ``normalize``); σ is ``noise_std``, else the monitor's, else 1. ``targets``:
        only these labels (the constants that are fitted; fixed ones left out), in that order."""
        report = self._results.report(stage, "fisher")
        return _restricted(report.labels, report.fisher(noise_std), targets, "fisher")

    def covariance(
        self, stage: Stage | None = None, noise_std: float | None = None, *, targets: list[str] | None = None
    ) -> tuple[list[str], Tensor]:
        """The linearised (Cramér–Rao) covariance of the constants fitted to this data, the inverse of
        :meth:`fisher`, as ``(labels, Tensor[K, K])``; ``inf`` in the row and column of a target the data do not
        determine (see the docs' page on uncertainty). Its diagonal's square root is
        ``summary()[label]["stderr"]``. ``targets``: the covariance of these alone, the others held fixed."""
        labels, f = self.fisher(stage, noise_std, targets=targets)
        return labels, covariance(f)[0]

    def identifiability(self, stage: Stage | None = None, *, targets: list[str] | None = None) -> dict[str, Any]:
        """How well the last logged epoch determines each target: ``labels``; ``eigenvalues`` (ascending) and
        ``eigenvectors`` (columns) of the scaled information ``D F D``, ``D = diag(θ)``; ``subsets``, the
        collinearity index of pairs and triples of targets; ``verdicts``, plain-language lines;
        ``estimate_correlation``, the correlation of the estimates (not of the sensitivities). ``targets``: of
        these labels alone, the others held fixed."""
        report = self._results.report(stage, "identifiability")
        if targets is None:
            return dict(report.identifiability)
        _restricted(report.labels, report.fisher(), targets, "identifiability")  # checks the labels
        return report.identifiability_of(targets)

    # ---- set-up ------------------------------------------------------------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        _check_strategy(trainer)
        _warn_if_run_in_other_processes(trainer)
        plans = self._differentiator.plans  # what the engine learned about the module (the mode it measured cheaper,
        # a fallback that worked) holds for the next fit or validate of the same module: not measured again
        self._differentiator = self._new_differentiator()
        self._differentiator.plans = plans
        self._differentiator.resolve(pl_module)
        _check_clashes(self, trainer)
        self._stages = {
            name: StageRun(name, StageSettings.of(self, name), self._differentiator, partial(_check_clashes, self))
            for name in _arguments.STAGES
        }
        self._publisher = Publisher(trainer, self.prefix, self.log_histograms, int(self.log_figures))
        if {"fit": "validate", "validate": "validate", "test": "test"}.get(stage) in self.stages:
            self._publisher.warn_if_incomplete()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._differentiator.disarm()
        if self._publisher is not None:
            self._publisher.figures.close()  # before the loggers close their writers

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._differentiator.disarm()
        if self._publisher is not None:
            with contextlib.suppress(Exception):  # the run's own exception is the one to report
                self._publisher.figures.close()

    # ---- the hooks: each hands the call to its stage ---------------------------------------------------------

    def _end_epoch(self, stage: str, trainer: Trainer, pl_module: LightningModule) -> None:
        report = self._stages[stage].epoch_end(trainer)  # collectives under DDP: every rank calls it
        if report is None or self._publisher is None:
            return
        self._results.keep(stage, report)
        self.epochs_logged += stage == "validate"
        self._publisher.publish(stage, trainer, pl_module, report)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if "validate" in self.stages and trainer.global_step == 0 and batch_idx == 0:
            self._differentiator.check_inputs(pl_module, batch)  # the sanity check was off: inputs unchecked

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._stages["validate"].epoch_start(trainer)

    def on_validation_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._stages["validate"].batch_start(trainer, batch, dataloader_idx)

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._stages["validate"].batch_end(trainer, batch, batch_idx, dataloader_idx)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._end_epoch("validate", trainer, pl_module)

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._stages["test"].epoch_start(trainer)

    def on_test_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._stages["test"].batch_start(trainer, batch, dataloader_idx)

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._stages["test"].batch_end(trainer, batch, batch_idx, dataloader_idx)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._end_epoch("test", trainer, pl_module)

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._stages["predict"].epoch_start(trainer)

    def on_predict_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._stages["predict"].batch_start(trainer, batch, dataloader_idx)

    def on_predict_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._stages["predict"].batch_end(trainer, batch, batch_idx, dataloader_idx)

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._end_epoch("predict", trainer, pl_module)


def _check_clashes(monitor: SensitivityMonitor, trainer: Trainer) -> None:
    """Refuse a second monitor that would write the same tags (one of the two would be lost)."""
    for other in trainer.callbacks:  # type: ignore[attr-defined]
        if other is monitor or not isinstance(other, SensitivityMonitor) or other.prefix != monitor.prefix:
            continue
        shared = [label for label in monitor.labels if label in other.labels]
        if shared and set(monitor.stages) & set(other.stages):
            raise ValueError(
                f"{API}(prefix={monitor.prefix!r}): another SensitivityMonitor on this Trainer also watches "
                f"{shared[0]!r} under the same prefix, so both would write '{monitor.prefix}/{shared[0]}' at the "
                f"same steps and one would be lost. Give one of them its own prefix, such as "
                f"SensitivityMonitor(..., prefix='{monitor.prefix}_2')."
            )


def _restricted(labels: list[str], matrix: Tensor, targets: list[str] | None, api: str) -> tuple[list[str], Tensor]:
    if targets is None:
        return list(labels), matrix
    unknown = [t for t in targets if t not in labels]
    if unknown:
        raise KeyError(f"{API}.{api}(targets=...): {unknown} are not among the monitor's labels {labels}.")
    index = [labels.index(t) for t in targets]
    return list(targets), matrix[index][:, index]


class _Results:
    """The last logged report of each stage, shared by a monitor and its deep copies."""

    def __init__(self) -> None:
        self.reports: dict[str, Report] = {}
        self.last: str | None = None

    def keep(self, stage: str, report: Report) -> None:
        self.reports[stage], self.last = report, stage

    def report(self, stage: str | None, api: str) -> Report:
        stage = self.last if stage is None else stage
        if stage not in self.reports:
            raise RuntimeError(
                f"{API}.{api}(): no {'' if stage is None else repr(stage) + ' '}epoch has been logged yet; "
                "call it after trainer.fit, validate, test or predict has run the monitor (in this process: "
                "with ddp_spawn, ddp_fork or ddp_notebook it runs in processes of their own)."
            )
        return self.reports[stage]


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
                f"{API}: the strategy {cls.__name__} is not supported: {reason}. Shard the model with "
                "ModelParallelStrategy and torch.distributed.fsdp.fully_shard (FSDP2) in configure_model, which "
                "the monitor supports, or use strategy='ddp'."
            )


def _warn_if_run_in_other_processes(trainer: Trainer) -> None:
    """Warn where the Trainer runs in processes that its launcher starts from the script's process by
    multiprocessing (spawn, fork), where the callbacks are copies whose results the script never sees."""
    launcher = getattr(trainer.strategy, "launcher", None)
    if any(cls.__name__ == "_MultiProcessingLauncher" for cls in type(launcher).__mro__):
        rank_zero_warn(
            f"{API}: this strategy starts its processes from the script's (ddp_spawn, ddp_fork, "
            "ddp_notebook): the monitor runs in them, on copies of itself, and the monitor object in the "
            "launching process is not updated. The logged scalars, histograms, tables and figures are "
            "right, but summary(), correlation() and profiles() there give nothing from this run (or an "
            "earlier run's numbers). Use strategy='ddp' to read them in the script."
        )
