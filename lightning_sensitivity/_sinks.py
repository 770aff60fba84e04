"""Where an epoch's :class:`~lightning_sensitivity._report.Report` goes besides ``pl_module.log``: TensorBoard
(histograms, the Markdown table, figures as images), Weights & Biases (histograms, the table, figures) and
MLflow (the table and figures, histograms drawn as figures, as artifacts: MLflow has no histogram type).

A sink is found per logger of the Trainer, for the loggers of ``lightning.pytorch`` and of the standalone
``pytorch_lightning`` package alike; every method runs on global rank zero only. ``figure`` is called from the
drawing thread, with the figure's pixels (``[H, W, 3]`` uint8, rendered once for every sink).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from lightning_sensitivity._report import Report

#: Weights & Biases refuses histograms of more bins than this.
WANDB_MAX_BINS = 512


def _logger_classes(name: str) -> tuple[type, ...]:
    """The logger class ``name`` of ``lightning.pytorch`` and, when it is imported, of ``pytorch_lightning``."""
    classes = []
    for package in ("lightning.pytorch.loggers", "pytorch_lightning.loggers"):
        module = sys.modules.get(package)
        if module is None and package == "lightning.pytorch.loggers":
            import lightning.pytorch.loggers as module
        cls = getattr(module, name, None) if module is not None else None
        if isinstance(cls, type):
            classes.append(cls)
    return tuple(classes)


class TensorBoardSink:
    """Histograms (``add_histogram_raw``), the table (text tab, under exactly ``<prefix>/summary``), figures
    (images tab)."""

    histograms_as_figures = False

    def __init__(self, logger: Any) -> None:
        self.logger = logger

    @property
    def writer(self) -> Any:
        return self.logger.experiment

    def histograms(self, prefix: str, report: Report) -> None:
        for label, hist in zip(report.labels, report.histograms, strict=True):
            if hist.num == 0:
                continue
            self.writer.add_histogram_raw(
                f"{prefix}/{label}",
                min=hist.min,
                max=hist.max,
                num=hist.num,
                sum=hist.sum,
                sum_squares=hist.sum_squares,
                bucket_limits=hist.bucket_limits,
                bucket_counts=hist.bucket_counts,
                global_step=report.step,
            )

    def table(self, tag: str, report: Report, text: str) -> None:
        self.text(tag, report, text)

    def text(self, tag: str, report: Report, text: str) -> None:
        """Markdown text under exactly ``tag``, in the text tab."""
        writer = self._file_writer()
        if writer is None:
            self.writer.add_text(tag, text, report.step)
            return
        from tensorboard.plugins.text.summary_v2 import text_pb  # add_text would append "/text_summary"

        writer.add_summary(text_pb(tag, text), report.step)

    def figure(self, tag: str, image: Any, step: int) -> None:
        writer = self._file_writer()
        if writer is None:
            self.writer.add_image(tag, image, step, dataformats="HWC")
            return
        writer.add_summary(_image_summary(tag, image), step)

    def _file_writer(self) -> Any:
        """The event file writer of torch's ``SummaryWriter``; ``None`` for another writer (tensorboardX's, or
        Lightning's stand-in on a process it takes for a non-zero rank), which is given its own summaries."""
        from torch.utils.tensorboard import SummaryWriter

        return self.writer._get_file_writer() if isinstance(self.writer, SummaryWriter) else None  # type: ignore[no-untyped-call]


def _image_summary(tag: str, image: Any) -> Any:
    """The image summary ``SummaryWriter.add_image`` writes for an ``[H, W, 3]`` uint8 array, at a quarter of
    its cost: it converts the pixels to float and back, resamples them to their own size and compresses
    harder, for PNGs about a tenth smaller."""
    import io

    from PIL import Image
    from tensorboard.compat.proto.summary_pb2 import Summary

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    height, width, channels = image.shape
    encoded = Summary.Image(height=height, width=width, colorspace=channels, encoded_image_string=buffer.getvalue())
    return Summary(value=[Summary.Value(tag=tag, image=encoded)])


class WandbSink:
    """Histograms as ``wandb.Histogram`` from the same exact buckets (at most 512 bins, neighbours merged), the
    table as a ``wandb.Table``, figures as ``wandb.Image``; every entry at ``trainer/global_step``."""

    histograms_as_figures = False

    def __init__(self, logger: Any) -> None:
        self.logger = logger

    def histograms(self, prefix: str, report: Report) -> None:
        import numpy as np
        import wandb

        entries = {}
        for label, hist in zip(report.labels, report.histograms, strict=True):
            if hist.num > 0:
                counts, edges = hist.bins(WANDB_MAX_BINS)
                bins = (np.asarray(counts), np.asarray(edges))
                entries[f"{prefix}/{label}"] = wandb.Histogram(np_histogram=bins)
        if entries:
            self.logger.log_metrics(entries, step=report.step)

    def table(self, tag: str, report: Report, text: str) -> None:
        import wandb

        names = ["rank", "target", "mean", "std", "abs_mean", "mean_square", "min", "max", "count", "nonfinite"]
        rows = [
            [label if name == "target" else report.stats[label][name] for name in names] for label in report.ranked()
        ]
        columns: list[str | int] = list(names)
        self.logger.log_metrics({tag: wandb.Table(columns=columns, data=rows)}, step=report.step)

    def text(self, tag: str, report: Report, text: str) -> None:
        import wandb

        rows = [[line] for line in text.splitlines() if line.strip()]
        self.logger.log_metrics({tag: wandb.Table(columns=["text"], data=rows)}, step=report.step)

    def figure(self, tag: str, image: Any, step: int) -> None:
        import wandb

        self.logger.log_metrics({tag: wandb.Image(image)}, step=step)


class MLflowSink:
    """The table (``log_text``) and figures (``log_image``, histograms among them) as artifacts of the run,
    under ``<tag>/step_<step>``: MLflow has no histogram, text or image series of its own."""

    histograms_as_figures = True

    def __init__(self, logger: Any) -> None:
        self.logger = logger

    def histograms(self, prefix: str, report: Report) -> None:
        pass  # drawn as figures

    def table(self, tag: str, report: Report, text: str) -> None:
        self.text(tag, report, text)

    def text(self, tag: str, report: Report, text: str) -> None:
        self.logger.experiment.log_text(self.logger.run_id, text, f"{tag}/step_{report.step:08d}.md")

    def figure(self, tag: str, image: Any, step: int) -> None:
        self.logger.experiment.log_image(self.logger.run_id, image, f"{tag}/step_{step:08d}.png")


Sink = TensorBoardSink | WandbSink | MLflowSink


def find_sinks(loggers: Sequence[Any]) -> list[Sink]:
    """A sink per TensorBoard, W&B and MLflow logger among ``loggers``, in their order."""
    kinds: list[tuple[tuple[type, ...], type]] = [
        (_logger_classes("TensorBoardLogger"), TensorBoardSink),
        (_logger_classes("WandbLogger"), WandbSink),
        (_logger_classes("MLFlowLogger"), MLflowSink),
    ]
    sinks: list[Sink] = []
    for logger in loggers:
        for classes, sink in kinds:
            if classes and isinstance(logger, classes):
                sinks.append(sink(logger))
                break
    return sinks
