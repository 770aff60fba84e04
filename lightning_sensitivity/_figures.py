"""Figures of an epoch's :class:`~lightning_sensitivity._report.Report`, drawn with matplotlib in one
background thread so that validation and training go on meanwhile.

matplotlib is optional (``pip install "lightning-sensitivity[plots]"``) and imported only here, only in the
drawing thread. Figures are ``matplotlib.figure.Figure`` objects (no pyplot, no GUI backend).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from torch import Tensor

from lightning_sensitivity._aggregate import Histogram
from lightning_sensitivity._report import Report

#: ``sink(tag, figure, step)``: where a drawn figure goes.
FigureSink = Callable[[str, Any, int], None]


def matplotlib_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


class FigureWriter:
    """Draws figures in one background thread and hands each to the sinks. :meth:`wait` before the sinks'
    loggers close."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[Future[None]] = []

    def submit(self, prefix: str, report: Report, sinks: Sequence[tuple[FigureSink, bool]]) -> None:
        """Draw ``<prefix>/ranking``, ``<prefix>/correlation`` and ``<prefix>/profile/<target>`` (per dataloader
        after the first: ``.../dataloader_<i>``) for every sink, and ``<prefix>/histogram/<target>`` for the
        sinks paired with ``True`` (loggers without a histogram type)."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sensitivity-figures")
        self._pending.append(self._executor.submit(_draw, prefix, report, list(sinks)))

    def wait(self) -> None:
        """Block until every submitted figure is handed over; re-raise the first drawing error."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()


def _draw(prefix: str, report: Report, sinks: list[tuple[FigureSink, bool]]) -> None:
    from matplotlib.figure import Figure

    figures = {f"{prefix}/ranking": ranking(Figure, report), f"{prefix}/correlation": correlation(Figure, report)}
    for idx, profiles in report.profiles.items():
        suffix = "" if idx == min(report.profiles) else f"/dataloader_{idx}"
        for label, profile in profiles.items():
            figures[f"{prefix}/profile/{label}{suffix}"] = profile_figure(Figure, label, profile)
    for tag, figure in figures.items():
        for sink, _ in sinks:
            sink(tag, figure, report.step)
    if any(histograms for _, histograms in sinks):
        for label, hist in zip(report.labels, report.histograms, strict=True):
            if hist.num > 0:
                figure = histogram_figure(Figure, label, hist, report.step)
                for sink, histograms in sinks:
                    if histograms:
                        sink(f"{prefix}/histogram/{label}", figure, report.step)


def pixels(figure: Any) -> Any:
    """The figure rendered to an ``[H, W, 3]`` uint8 array."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()  # type: ignore[no-untyped-call]
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()  # type: ignore[no-untyped-call]


def ranking(Figure: Any, report: Report) -> Any:  # noqa: N803 (the class is passed in, imported lazily)
    """Morris-style importance: μ* (mean |dy/dθ|) per target with σ as an error bar, rank 1 at the top."""
    labels = report.ranked()
    k = len(labels)
    figure = Figure(figsize=(6.0, 1.2 + 0.35 * k), dpi=80, layout="constrained")
    axes = figure.add_subplot()
    mu_star = [report.stats[label]["abs_mean"] for label in labels]
    sigma = [report.stats[label]["std"] for label in labels]
    axes.barh(range(k), mu_star, xerr=sigma, color="tab:blue", ecolor="0.3", capsize=3)
    axes.set_yticks(range(k), labels)
    axes.invert_yaxis()
    axes.set_xlabel("μ* = mean |dy/dθ|  (error bar: σ of dy/dθ)")
    axes.set_title(f"importance ranking, step {report.step}")
    return figure


def correlation(Figure: Any, report: Report) -> Any:  # noqa: N803
    """The Pearson correlation of the targets' sensitivities: near ±1, two targets cannot be told apart."""
    k = len(report.labels)
    size = 2.5 + 0.45 * k
    figure = Figure(figsize=(size + 1.0, size), dpi=80, layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(report.correlation.numpy(), vmin=-1, vmax=1, cmap="RdBu_r")
    axes.set_xticks(range(k), report.labels, rotation=90)
    axes.set_yticks(range(k), report.labels)
    if k <= 12:
        for i in range(k):
            for j in range(k):
                value = float(report.correlation[i, j])
                axes.text(j, i, "—" if math.isnan(value) else f"{value:.2f}", ha="center", va="center", fontsize=8)
    figure.colorbar(image, ax=axes, label="correlation")
    axes.set_title(f"correlation of sensitivities (collinearity {report.collinearity:.4g})")
    return figure


def profile_figure(Figure: Any, label: str, profile: dict[str, Tensor]) -> Any:  # noqa: N803
    """The mean and mean |dy/dθ| of every output element, over the flattened output."""
    figure = Figure(figsize=(6.0, 3.0), dpi=80, layout="constrained")
    axes = figure.add_subplot()
    axes.plot(profile["mean"].reshape(-1).numpy(), label="mean dy/dθ")
    axes.plot(profile["abs_mean"].reshape(-1).numpy(), label="mean |dy/dθ|")
    axes.axhline(0.0, color="0.6", linewidth=0.8)
    shape = tuple(profile["mean"].shape)
    axes.set_xlabel("output element" + (f" (flattened from {shape})" if len(shape) > 1 else ""))
    axes.set_title(f"profile of {label}")
    axes.legend(loc="best", fontsize=8)
    return figure


def histogram_figure(Figure: Any, label: str, hist: Histogram, step: int) -> Any:  # noqa: N803
    """The histogram's buckets as bars of their true widths (for loggers without a histogram type)."""
    figure = Figure(figsize=(6.0, 3.0), dpi=80, layout="constrained")
    axes = figure.add_subplot()
    counts, edges = hist.bins()
    widths = [b - a for a, b in zip(edges[:-1], edges[1:], strict=True)]
    axes.bar(edges[:-1], counts, width=widths, align="edge", color="tab:blue", edgecolor="none")
    axes.set_xlabel(f"dy/dθ  ({hist.num} values, {hist.nonfinite} non-finite left out)")
    axes.set_ylabel("count")
    axes.set_title(f"{label}, step {step}")
    return figure
