"""Where a logged epoch's :class:`~lightning_sensitivity._report.Report` goes: scalars through ``pl_module.log``
(every logger, ``trainer.callback_metrics``), and on global rank zero the histograms and the table to the sinks
(``_sinks.py``: TensorBoard, W&B, MLflow) and the figures to the drawing thread (``_figures.py``).
"""

from __future__ import annotations

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from lightning_sensitivity._figures import FigureWriter, matplotlib_available
from lightning_sensitivity._report import SCALARS, Report, identifiability_markdown, markdown
from lightning_sensitivity._sinks import Sink, find_sinks

API = "SensitivityMonitor"


class Publisher:
    """Logs a monitor's reports for one Trainer run (made in ``setup``).

    Args:
        prefix: the first part of every tag of the validation stage (``<prefix>_<stage>`` for the others).
        histograms: write the histograms.
        figures: draw the figures every this many logged epochs of a stage (``0``: never).
    """

    def __init__(self, trainer: Trainer, prefix: str, histograms: bool, figures: int) -> None:
        self.prefix, self.histograms = prefix, histograms
        self.sinks: list[Sink] = find_sinks(trainer.loggers)
        self.draws = figures > 0 and bool(self.sinks) and matplotlib_available()
        self.every = figures
        self.figures = FigureWriter()
        self._epochs: dict[str, int] = {}
        self._constant: set[str] = set()

    def warn_if_incomplete(self) -> None:
        """Warn where histograms or figures were asked for and cannot be written."""
        if self.histograms and not self.sinks:
            rank_zero_warn(
                f"{API}: the Trainer has no TensorBoard, W&B or MLflow logger, so no sensitivity histograms, "
                "tables or figures are written; the summary scalars still go to every logger. Add "
                "lightning.pytorch.loggers.TensorBoardLogger to `Trainer(logger=...)`, or pass "
                "log_histograms=False to silence this warning."
            )
        if self.every > 0 and self.sinks and not self.draws:
            rank_zero_warn(
                f"{API}: matplotlib is not installed, so the ranking, correlation and profile figures are not "
                'drawn (the table and the scalars still are). pip install "lightning-sensitivity[plots]" to get '
                "them, or pass log_figures=False to silence this warning."
            )

    def tag(self, stage: str) -> str:
        return self.prefix if stage == "validate" else f"{self.prefix}_{stage}"

    def publish(self, stage: str, trainer: Trainer, pl_module: LightningModule, report: Report) -> None:
        """Log one epoch of ``stage`` (every rank: the scalars are logged with ``sync_dist``)."""
        prefix = self.tag(stage)
        if stage != "predict":  # predict has no logger
            scalars = (*SCALARS, "stderr") if report.noise_std is not None else SCALARS
            for label in report.labels:
                for stat in scalars:
                    _log(pl_module, f"{prefix}/{label}/{stat}", report.stats[label][stat])
            _log(pl_module, f"{prefix}/collinearity", report.collinearity)
        self._warn_constant(report)
        epochs = self._epochs[stage] = self._epochs.get(stage, 0) + 1
        if not trainer.is_global_zero or stage == "predict":
            return
        table = markdown(report, prefix)
        verdicts = identifiability_markdown(report, prefix)
        for sink in self.sinks:
            if self.histograms:
                sink.histograms(prefix, report)
            sink.table(f"{prefix}/summary", report, table)
            sink.text(f"{prefix}/identifiability", report, verdicts)
        if self.draws and (epochs - 1) % self.every == 0:
            wanted = [(sink.figure, self.histograms and sink.histograms_as_figures) for sink in self.sinks]
            self.figures.submit(prefix, report, wanted)

    def _warn_constant(self, report: Report) -> None:
        for label, hist in zip(report.labels, report.histograms, strict=True):
            if hist.num > 0 and hist.min == 0.0 and hist.max == 0.0 and label not in self._constant:
                self._constant.add(label)
                rank_zero_warn(
                    f"{API}: every sensitivity to {label!r} is zero; the model's output does not depend on it "
                    "(moving it does not move the output either). Check the target name."
                )


def _log(pl_module: LightningModule, name: str, value: float) -> None:
    pl_module.log(
        name,
        float(value),
        on_step=False,
        on_epoch=True,
        # Every rank holds the same, already reduced value: a max over ranks keeps it exactly (a mean could round)
        # and spares Lightning's warning about unsynced epoch-level values.
        sync_dist=True,
        reduce_fx="max",
        add_dataloader_idx=False,
    )
