"""Figures of an epoch's :class:`~lightning_sensitivity._report.Report`, drawn with matplotlib in one
background thread so that validation and training go on meanwhile.

A figure is built once and redrawn with each epoch's numbers (and, for profiles, each target's): its axes,
ticks and colour bar are made once, and a later epoch's figures cost about a third less (``python
benchmarks/figures.py``). A redrawn figure is pixel for pixel the figure built afresh (tested).

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
        #: figures to redraw at the next epoch, by what they show (tag prefix, kind, labels or output shape);
        #: touched by the drawing thread only, and by :meth:`close` once it is idle
        self._kept: dict[tuple[Any, ...], Any] = {}

    def submit(self, prefix: str, report: Report, sinks: Sequence[tuple[FigureSink, bool]]) -> None:
        """Draw ``<prefix>/ranking``, ``<prefix>/correlation`` and ``<prefix>/profile/<target>`` (per dataloader
        after the first: ``.../dataloader_<i>``) for every sink, and ``<prefix>/histogram/<target>`` for the
        sinks paired with ``True`` (loggers without a histogram type)."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sensitivity-figures")
        self._pending.append(self._executor.submit(_draw, prefix, report, list(sinks), self._kept))

    def wait(self) -> None:
        """Block until every submitted figure is handed over; re-raise the first drawing error."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def close(self) -> None:
        """:meth:`wait`, then let the kept figures and the thread go (a later :meth:`submit` starts afresh)."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            self._kept.clear()


def _draw(prefix: str, report: Report, sinks: list[tuple[FigureSink, bool]], kept: dict[tuple[Any, ...], Any]) -> None:
    """Draw one epoch's figures for ``sinks``. Every sink is done with a figure when it returns, so a figure in
    ``kept`` (keyed by what fixes its layout) is redrawn with the next numbers."""
    from matplotlib.figure import Figure

    def hand_over(tag: str, figure: Any) -> None:
        for sink, _ in sinks:
            sink(tag, figure, report.step)

    labels = tuple(report.labels)
    key: tuple[Any, ...] = (prefix, "ranking", labels)
    kept[key] = ranking(Figure, report, reuse=kept.get(key))
    hand_over(f"{prefix}/ranking", kept[key])
    key = (prefix, "correlation", labels)
    kept[key] = correlation(Figure, report, reuse=kept.get(key))
    hand_over(f"{prefix}/correlation", kept[key])
    for idx, profiles in report.profiles.items():
        suffix = "" if idx == min(report.profiles) else f"/dataloader_{idx}"
        for label, profile in profiles.items():  # one figure per output shape, redrawn for each target
            key = (prefix, "profile", tuple(profile["mean"].shape))
            kept[key] = profile_figure(Figure, label, profile, reuse=kept.get(key))
            hand_over(f"{prefix}/profile/{label}{suffix}", kept[key])
    if any(histograms for _, histograms in sinks):
        for label, hist in zip(report.labels, report.histograms, strict=True):
            if hist.num > 0:
                figure = histogram_figure(Figure, label, hist, report.step)
                for sink, histograms in sinks:
                    if histograms:
                        sink(f"{prefix}/histogram/{label}", figure, report.step)


def pixels(figure: Any) -> Any:
    """The figure rendered to an ``[H, W, 3]`` uint8 array, on an Agg canvas kept with the figure: a redrawn
    figure reuses its renderer, and with it matplotlib's cache of measured texts (about a tenth less time)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = figure.canvas if isinstance(figure.canvas, FigureCanvasAgg) else FigureCanvasAgg(figure)
    canvas.draw()  # type: ignore[no-untyped-call]
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()  # type: ignore[no-untyped-call]


#: Inches per character of tick-label text (DejaVu Sans at 10 pt, a little generous): margins are sized from the
#: labels' lengths instead of by a layout engine, which measures every text several times (half a figure's cost).
_CHAR = 0.08
_DPI = 80


def _figure(  # noqa: N803
    Figure: Any, width: float, height: float, left: float, bottom: float, right: float = 0.25
) -> tuple[Any, Any]:
    """A figure of ``width`` x ``height`` inches with one axes inside margins of ``left``, ``bottom`` and
    ``right`` inches (and room for a title above)."""
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(width, height), dpi=_DPI)
    figure.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - 0.4 / height)
    axes = figure.add_subplot()
    for axis in (axes.xaxis, axes.yaxis):  # fewer ticks: each is several artists, laid out at every draw
        axis.set_major_locator(MaxNLocator(nbins=5))
    return figure, axes


def _title(axes: Any, text: str) -> None:
    """A title at a fixed height (an automatic one measures the tick labels beneath it at every draw)."""
    axes.set_title(text, y=1.01)


def ranking(Figure: Any, report: Report, reuse: Any = None) -> Any:  # noqa: N803 (the class is passed in, imported lazily)
    """Morris-style importance: μ* (mean |dy/dθ|) per target with σ as an error bar, rank 1 at the top.
    ``reuse``: a ranking figure of the same targets, redrawn with this report."""
    labels = report.ranked()
    k = len(labels)
    if reuse is None:
        left = 0.3 + _CHAR * max(len(label) for label in labels)
        figure, axes = _figure(Figure, 5.5 + left, 1.2 + 0.35 * k, left, 0.6)
        axes.set_xlabel("μ* = mean |dy/dθ|  (line: ± σ of dy/dθ)")
        _title(axes, "")
    else:
        figure, axes = reuse, reuse.axes[0]
        for artist in [*axes.patches, *axes.collections]:
            artist.remove()
        axes.relim()  # forget the last epoch's data limits (none are left)
    mu_star = [report.stats[label]["abs_mean"] for label in labels]
    sigma = [report.stats[label]["std"] for label in labels]
    axes.barh(range(k), mu_star, color="tab:blue")
    # one collection for every error bar, not an errorbar container of lines and caps per target
    low = [m - s for m, s in zip(mu_star, sigma, strict=True)]
    high = [m + s for m, s in zip(mu_star, sigma, strict=True)]
    axes.hlines(range(k), low, high, colors="0.3")
    axes.set_yticks(range(k), labels)
    axes.set_ylim(k - 0.5, -0.5)  # rank 1 at the top
    axes.title.set_text(f"importance ranking, step {report.step}")
    return figure


def correlation(Figure: Any, report: Report, reuse: Any = None) -> Any:  # noqa: N803
    """The Pearson correlation of the targets' sensitivities: near ±1, two targets cannot be told apart.
    ``reuse``: a correlation figure of the same targets, redrawn with this report."""
    k = len(report.labels)
    values = report.correlation.numpy()
    if reuse is None:
        margin = 0.3 + _CHAR * max(len(label) for label in report.labels)
        side = 2.0 + 0.4 * k
        figure, axes = _figure(Figure, side + margin + 1.3, side + margin + 0.4, margin, margin, right=1.3)
        image = axes.imshow(values, vmin=-1, vmax=1, cmap="RdBu_r")
        axes.set_xticks(range(k), report.labels, rotation=90)
        axes.set_yticks(range(k), report.labels)
        if k <= 12:
            for i in range(k):
                for j in range(k):
                    axes.text(j, i, "", ha="center", va="center", fontsize=8)
        bar = figure.colorbar(image, ax=axes, label="correlation", fraction=0.05, pad=0.03)
        bar.set_ticks([-1.0, -0.5, 0.0, 0.5, 1.0])  # not nine: each tick label is a text to lay out and draw
        _title(axes, "")
    else:
        figure, axes = reuse, reuse.axes[0]
        axes.images[0].set_data(values)
    if k <= 12:  # the values written in the cells
        for text, value in zip(axes.texts, values.reshape(-1).tolist(), strict=True):
            text.set_text("—" if math.isnan(value) else f"{value:.2f}")
    axes.title.set_text(f"correlation, collinearity {report.collinearity:.4g}")  # fits above 1 target
    return figure


def profile_figure(Figure: Any, label: str, profile: dict[str, Tensor], reuse: Any = None) -> Any:  # noqa: N803
    """The mean and mean |dy/dθ| of every output element, over the flattened output. ``reuse``: an earlier
    profile figure of an output of the same shape, redrawn with this profile (about half the cost of a new one:
    no new axes, ticks and legend)."""
    if reuse is not None:
        axes = reuse.axes[0]
        for line, key in zip(axes.lines[:2], ("mean", "abs_mean"), strict=True):
            line.set_ydata(profile[key].reshape(-1).numpy())
        axes.relim()
        axes.autoscale_view()
        axes.title.set_text(f"profile of {label}")
        return reuse
    figure, axes = _figure(Figure, 7.3, 3.0, 0.85, 0.5, right=1.5)
    axes.plot(profile["mean"].reshape(-1).numpy(), label="mean dy/dθ")
    axes.plot(profile["abs_mean"].reshape(-1).numpy(), label="mean |dy/dθ|")
    axes.axhline(0.0, color="0.6", linewidth=0.8)
    shape = tuple(profile["mean"].shape)
    axes.set_xlabel("output element" + (f" (flattened from {shape})" if len(shape) > 1 else ""))
    _title(axes, f"profile of {label}")
    # beside the axes, never over a curve ("best" would search every position: a third of the figure's cost)
    axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    return figure


def histogram_figure(Figure: Any, label: str, hist: Histogram, step: int) -> Any:  # noqa: N803
    """The histogram's buckets as bars of their true widths (for loggers without a histogram type)."""
    figure, axes = _figure(Figure, 6.0, 3.0, 0.85, 0.5)
    counts, edges = hist.bins()
    widths = [b - a for a, b in zip(edges[:-1], edges[1:], strict=True)]
    axes.bar(edges[:-1], counts, width=widths, align="edge", color="tab:blue", edgecolor="none")
    axes.set_xlabel(f"dy/dθ  ({hist.num} values, {hist.nonfinite} non-finite left out)")
    axes.set_ylabel("count")
    _title(axes, f"{label}, step {step}")
    return figure
