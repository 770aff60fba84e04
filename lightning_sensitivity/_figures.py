"""Figures of an epoch's :class:`~lightning_sensitivity._report.Report`, drawn with matplotlib in one background
thread so that validation and training go on meanwhile.

At most four figures per logged epoch, whatever the number of targets K, on canvases of bounded size:

- ``<prefix>/ranking``: μ* and σ of the first :data:`TOP` targets by μ*, side by side;
- ``<prefix>/correlation``: the correlation of the same targets (in their order), numbers written only in
  cells wide enough to read them, and the collinearity index of all K with its scale;
- ``<prefix>/profiles`` (``profiles=True``; per dataloader after the first: ``.../dataloader_<i>``): small
  multiples of the profiles of the first :data:`PANELS` targets by μ*;
- ``<prefix>/histograms``, for loggers without a histogram type: small multiples of the same targets.

A title says when a figure shows the first targets by μ* only; where all targets are elements of one tensor,
the title names it and the labels are indices. Time and memory are bounded by what is shown: at most a text per
row and column and a few more (matplotlib's cost is mostly its texts: tick labels are plain texts, laid out
once), under 800 px a side. A figure is built once and redrawn with each epoch's numbers; a redrawn figure is
pixel for pixel the figure built afresh (tested).

matplotlib is optional (``pip install "lightning-sensitivity[plots]"``) and imported only here, only in the
drawing thread. Figures are ``matplotlib.figure.Figure`` objects (no pyplot, no GUI backend); sinks receive
their pixels, ``[H, W, 3]`` uint8, rendered once for every logger.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from lightning_sensitivity._report import Report

#: ``sink(tag, pixels, step)``: where a drawn figure goes, as an ``[H, W, 3]`` uint8 array.
FigureSink = Callable[[str, Any, int], None]

#: The ranking and the correlation show at most this many targets, the first by μ*.
TOP = 20
#: The small multiples (profiles, histograms) show at most this many targets, the first by μ*.
PANELS = 16
#: The scale of the collinearity index, as Brun, Reichert and Künsch (2001) give it.
COLLINEARITY_SCALE = "> 10–15: poorly identifiable"

_DPI = 80
#: Inches per character of 8–9 pt text (DejaVu Sans, a little generous): margins are sized from the labels'
#: lengths instead of by a layout engine, which measures every text several times.
_CHAR = 0.075
#: Labels longer than this are shortened in the middle (the index at the end stays).
_LABEL_CHARS = 28
#: Correlation cells at least this many inches wide (36 px) hold their value written out, at 8 pt.
_NUMBER_CELL = 0.45
#: A profile of more output elements is drawn as the envelope (min and max) of this many bins.
_PROFILE_BINS = 512
_MU_COLOR, _SIGMA_COLOR, _UNDEFINED = "tab:blue", "tab:orange", "0.82"


def matplotlib_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


class FigureWriter:
    """Draws figures in one background thread and hands their pixels to the sinks. :meth:`wait` before the
    sinks' loggers close."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[Future[None]] = []
        #: figures to redraw at the next epoch, by what fixes their layout (tag, kind, labels, output shape);
        #: touched by the drawing thread only, and by :meth:`close` once it is idle
        self._kept: dict[tuple[Any, ...], Any] = {}

    def submit(self, prefix: str, report: Report, sinks: Sequence[tuple[FigureSink, bool]]) -> None:
        """Draw ``<prefix>/ranking``, ``<prefix>/correlation`` and ``<prefix>/profiles`` (per dataloader after the
        first: ``.../dataloader_<i>``) for every sink, and ``<prefix>/histograms`` for the sinks paired with
        ``True`` (loggers without a histogram type)."""
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
    """Draw one epoch's figures for ``sinks``. A figure is rendered once and its pixels go to every sink, so a
    figure in ``kept`` (keyed by what fixes its layout) is redrawn with the next numbers."""
    from matplotlib.figure import Figure

    labels = tuple(report.labels)

    def draw(tag: str, key: tuple[Any, ...], build: Callable[..., Any], *args: Any, histograms: bool = False) -> None:
        key = (prefix, *key, labels)
        kept[key] = build(Figure, report, *args, reuse=kept.get(key))
        image = pixels(kept[key])
        for sink, wants_histograms in sinks:
            if wants_histograms or not histograms:
                sink(tag, image, report.step)

    draw(f"{prefix}/ranking", ("ranking",), ranking)
    draw(f"{prefix}/correlation", ("correlation",), correlation)
    for idx in report.profiles:
        suffix = "" if idx == min(report.profiles) else f"/dataloader_{idx}"
        shape = tuple(next(iter(report.profiles[idx].values()))["mean"].shape)
        draw(f"{prefix}/profiles{suffix}", ("profiles", shape), profiles, idx)
    if any(histograms for _, histograms in sinks):
        draw(f"{prefix}/histograms", ("histograms",), histograms, histograms=True)


def pixels(figure: Any) -> Any:
    """The figure rendered to an ``[H, W, 3]`` uint8 array, on an Agg canvas kept with the figure: a redrawn
    figure reuses its renderer, and with it matplotlib's cache of measured texts (about a tenth less time)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = figure.canvas if isinstance(figure.canvas, FigureCanvasAgg) else FigureCanvasAgg(figure)
    canvas.draw()  # type: ignore[no-untyped-call]
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()  # type: ignore[no-untyped-call]


# ---- pieces shared by the figures ---------------------------------------------------------------------------


def shorten(label: str, width: int = _LABEL_CHARS) -> str:
    """``label`` in at most ``width`` characters, cut in the middle so that an index at the end stays.

    Example:
        >>> shorten("encoder.layers.3.self_attn.in_proj_weight[12, 7]")
        'encoder.layer…_weight[12, 7]'
    """
    if len(label) <= width:
        return label
    tail = width // 2
    return f"{label[: width - 1 - tail]}…{label[-tail:]}"


def number(value: float, digits: int = 4) -> str:
    """``value`` to ``digits`` significant digits; ``—`` for NaN, ``∞`` for infinity."""
    if math.isnan(value):
        return "—"
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    return f"{value:.{digits}g}"


class _Shown:
    """The targets a figure shows, the first ``limit`` by μ* (rank order), and how it writes them: where every
    target is an element of one tensor, its name is said once, in the title, and each label is its index."""

    def __init__(self, report: Report, limit: int) -> None:
        ranked = report.ranked()
        self.labels = ranked[:limit]
        k = len(ranked)
        tensor = _shared_tensor(report.labels)
        what = f"elements of {tensor}" if tensor else "targets"
        #: what the title says of the targets shown: ``""`` when they are all, and all are written in full
        self.subject = f"top {limit} of {k} {what} by μ*" if k > limit else f"{k} {what}" if tensor else ""
        self._cut = len(tensor)
        #: the inches that the longest label of any target takes, for margins that stay from epoch to epoch
        self.width = _CHAR * max(len(self.name(label)) for label in report.labels)

    def name(self, label: str, width: int = _LABEL_CHARS) -> str:
        return shorten(label[self._cut :], width)

    def title(self, what: str, step: int, where: str = "") -> str:
        return f"{what}{': ' + self.subject if self.subject else ''}{where}, step {step}"


def _shared_tensor(labels: Sequence[str]) -> str:
    """The tensor name of which every label is an element (``net.2.weight`` of ``net.2.weight[3, 1]``), or
    ``""``."""
    name = labels[0].split("[", 1)[0]
    shared = len(labels) > 1 and all(label.startswith(f"{name}[") for label in labels)
    return name if shared else ""


def _title(figure: Any, height: float, lines: int = 1) -> Any:
    """A title text at the top of the figure (a figure text: an axes title measures the ticks beneath it)."""
    return figure.text(0.5, 1 - 0.1 / height, "\n" * (lines - 1), ha="center", va="top", fontsize=9.5)


def _finite(value: float) -> float:
    return value if math.isfinite(value) else 0.0


# ---- the figures --------------------------------------------------------------------------------------------


def ranking(Figure: Any, report: Report, reuse: Any = None) -> Any:  # noqa: N803 (the class is passed in, imported lazily)
    """Morris' measures of the first :data:`TOP` targets by μ*, rank 1 at the top: μ* (mean |dy/dθ|, the size of
    the effect) and, beside it, σ (std of dy/dθ: how much it changes from sample to sample). ``reuse``: a ranking
    figure of the same targets, redrawn with this report."""
    from matplotlib.ticker import MaxNLocator

    shown = _Shown(report, TOP)
    n = len(shown.labels)
    if reuse is None:
        left = 0.3 + shown.width
        width, height = max(4.6 + left, 5.4), 1.3 + 0.3 * max(n, 2)
        figure = Figure(figsize=(width, height), dpi=_DPI)
        axes = figure.add_axes((left / width, 0.75 / height, 1 - (left + 0.3) / width, 1 - 1.3 / height))
        axes.xaxis.set_major_locator(MaxNLocator(nbins=5))
        axes.set_yticks([])
        mu = axes.barh([i - 0.19 for i in range(n)], [0.0] * n, height=0.38, color=_MU_COLOR)
        sigma = axes.barh([i + 0.19 for i in range(n)], [0.0] * n, height=0.38, color=_SIGMA_COLOR)
        axes.set_ylim(n - 0.5, -0.5)  # rank 1 at the top
        _labels(axes, n, "y", fontsize=9)
        labels = ["μ* = mean |dy/dθ|", "σ = std of dy/dθ"]
        figure.legend([mu, sigma], labels, loc="lower center", ncols=2, frameon=False, fontsize=9)
        _title(figure, height)
    else:
        figure, axes = reuse, reuse.axes[0]
    values = [_finite(report.stats[label][stat]) for stat in ("abs_mean", "std") for label in shown.labels]
    for bar, value in zip(axes.patches, values, strict=True):
        bar.set_width(value)
    axes.set_xlim(0.0, 1.05 * (max(values) or 1.0))
    for text, label in zip(axes.texts, shown.labels, strict=True):
        text.set_text(shown.name(label))
    what = "importance ranking" if shown.subject else "importance ranking by μ*"
    figure.texts[0].set_text(shown.title(what, report.step))
    return figure


def correlation(Figure: Any, report: Report, reuse: Any = None) -> Any:  # noqa: N803
    """The Pearson correlation of the sensitivities of the first :data:`TOP` targets by μ* (in the targets'
    order) below the diagonal, and the correlation of their estimates (from the covariance) above it: near ±1,
    two targets cannot be told apart. Undefined cells (a target without variance, or one the data do not
    determine) are grey and
    written ``—``; values are written where a cell is wide enough to read them. Rows are named and numbered,
    columns numbered. The title gives the collinearity index of all targets with its scale. ``reuse``: a
    correlation figure of the same targets, redrawn."""
    import numpy as np
    from matplotlib import colormaps

    shown = _Shown(report, TOP)
    position = {label: i for i, label in enumerate(report.labels)}
    index = sorted(position[label] for label in shown.labels)
    n = len(index)
    side = min(max(0.5 * n, 1.6), 5.0)
    written = side / n >= _NUMBER_CELL  # the values in the cells are legible
    sensitivities = report.correlation.numpy()[np.ix_(index, index)]
    estimates = _estimates(report)[np.ix_(index, index)]
    values = np.where(np.tri(n, dtype=bool), sensitivities, estimates)  # sensitivities below, estimates above
    values = np.where(np.isfinite(values), values, np.nan)  # an undefined correlation is blank, never ±inf
    cmap = colormaps["RdBu_r"].with_extremes(bad=_UNDEFINED)
    if reuse is None:
        margin = 0.3 + shown.width + 0.25  # and the row's number
        width = max(margin + side + 1.3, 6.0)
        left = margin + (width - margin - side - 1.3) / 2  # centred, whatever the title's width needs
        height = side + 1.25
        figure = Figure(figsize=(width, height), dpi=_DPI)
        axes = figure.add_axes((left / width, 0.5 / height, side / width, side / height))
        axes.set_axis_off()  # no ticks: the names and numbers are plain texts, laid out once
        axes.imshow(values, vmin=-1, vmax=1, cmap=cmap, interpolation="nearest", aspect="auto")
        size = 9 if n <= 10 else 8
        _labels(axes, n, "y", fontsize=size)
        _labels(axes, n, "x", fontsize=size)
        if written:
            for i in range(n):
                for j in range(n):
                    axes.text(j, i, "", ha="center", va="center", fontsize=8)
        _title(figure, height, lines=2)
        figure.text(0.02, 0.02, "", fontsize=8)  # says what grey cells are, where there are any
        _colorbar(figure, cmap, (left + side + 0.2) / width, 0.5 / height, side / height)
    else:
        figure, axes = reuse, reuse.axes[0]
        axes.images[0].set_data(values)
    names = [f"{shown.name(report.labels[i])}  {row + 1}" for row, i in enumerate(index)]
    cells = values.reshape(-1).tolist() if written else []
    for text, name in zip(axes.texts, [*names, *(str(j + 1) for j in range(n))], strict=False):
        text.set_text(name)
    for text, value in zip(axes.texts[2 * n :], cells, strict=True):
        text.set_text("—" if math.isnan(value) else f"{value:.2f}")
        text.set_color("white" if abs(value) > 0.6 else "black")  # NaN compares False: black on grey
    of_all = f" of all {len(report.labels)} targets:" if len(shown.labels) < len(report.labels) else ""
    figure.texts[0].set_text(
        f"{shown.title('correlation: sensitivities (lower left), estimates (upper right)', report.step)}\n"
        f"collinearity index{of_all} {number(report.collinearity)} ({COLLINEARITY_SCALE})"
    )
    undefined = bool(np.isnan(values).any())
    figure.texts[1].set_text("grey: undefined (no variance, or not determined)" if undefined else "")
    return figure


def _estimates(report: Report) -> Any:
    """The correlation of the estimates, ``[K, K]`` (NaN everywhere where the report holds no information)."""
    import numpy as np

    if report.information is None or report.theta is None or report.products is None:
        return np.full((len(report.labels),) * 2, np.nan)
    return report.identifiability["estimate_correlation"].numpy()


def _labels(axes: Any, n: int, axis: str, fontsize: float) -> None:
    """``n`` blank texts beside the axes, one per row (``"y"``, on the left) or column (``"x"``, below): tick
    labels without ticks, which matplotlib rebuilds and measures at every draw."""
    from matplotlib.transforms import blended_transform_factory

    if axis == "y":
        transform = blended_transform_factory(axes.transAxes, axes.transData)
        for i in range(n):
            axes.text(-0.015, i, "", transform=transform, ha="right", va="center", fontsize=fontsize)
    else:
        transform = blended_transform_factory(axes.transData, axes.transAxes)
        for j in range(n):
            axes.text(j, -0.015, "", transform=transform, ha="center", va="top", fontsize=fontsize)


def _colorbar(figure: Any, cmap: Any, x: float, y: float, height: float) -> None:
    """A colour bar of ``cmap`` from -1 to 1, its bottom left corner at ``(x, y)`` and ``height`` tall in figure
    coordinates: pixels and four texts (a colour bar's own axes and ticks cost as much as the heatmap)."""
    import numpy as np

    width, tall = figure.bbox.width, figure.bbox.height  # pixels
    rows = int(round(height * tall))
    colors = cmap(np.linspace(1.0, 0.0, rows), bytes=True)  # from +1 at the top to -1
    figure.figimage(np.repeat(colors[:, None, :], 12, axis=1), int(x * width), int(y * tall))
    ticks = x + 16 / width
    for value, at in (("1", y + height), ("0", y + height / 2), ("−1", y)):
        figure.text(ticks, at, value, ha="left", va="center", fontsize=8)
    figure.text(ticks + 22 / width, y + height / 2, "correlation", rotation=90, va="center", fontsize=8)


def profiles(Figure: Any, report: Report, idx: int, reuse: Any = None) -> Any:  # noqa: N803
    """Small multiples of the profiles of dataloader ``idx`` (mean dy/dθ and mean |dy/dθ| of every output
    element, over the flattened output) of the first :data:`PANELS` targets by μ*, each panel on its own
    symmetric scale. ``reuse``: a profiles figure of the same targets and output shape, redrawn."""
    import numpy as np
    from matplotlib.collections import LineCollection
    from matplotlib.lines import Line2D

    shown = _Shown(report, PANELS)
    n = len(shown.labels)
    curves = {label: report.profiles[idx][label] for label in shown.labels}
    shape = tuple(curves[shown.labels[0]]["mean"].shape)
    if reuse is None:
        figure, axes = _panels(Figure, n, zero=True)
        for color in (_SIGMA_COLOR, _MU_COLOR):  # the signed mean on top, where the two coincide
            axes.add_collection(LineCollection([], colors=color, linewidths=1.2))
        handles = [Line2D([], [], color=color) for color in (_MU_COLOR, _SIGMA_COLOR)]
        figure.legend(handles, ["mean dy/dθ", "mean |dy/dθ|"], loc="lower left", ncols=2, frameon=False, fontsize=9)
        flattened = f" (flattened from {shape})" if len(shape) > 1 else ""
        count = math.prod(shape)
        figure.text(
            0.98, 0.02, f"x: output element 0…{count - 1}{flattened}; y: ±s after the label, dashed 0",
            ha="right", va="bottom", fontsize=8,
        )  # fmt: skip
    else:
        figure, axes = reuse, reuse.axes[0]
    abs_lines, mean_lines = axes.collections[-2:]
    segments: tuple[list[Any], list[Any]] = ([], [])
    for (x0, y0, x1, y1), label, text in zip(_boxes(n), shown.labels, axes.texts, strict=True):
        mean = curves[label]["mean"].reshape(-1).double().numpy()
        abs_mean = curves[label]["abs_mean"].reshape(-1).double().numpy()
        finite = np.abs(np.concatenate([mean, abs_mean]))
        finite = finite[np.isfinite(finite)]
        scale = float(finite.max()) if finite.size else math.nan
        unit = scale if scale > 0 else 1.0  # NaN compares False
        for curve, out in ((mean, segments[0]), (abs_mean, segments[1])):
            x, y = _envelope(curve)
            out.append(np.stack([x0 + (x1 - x0) * x, (y0 + y1) / 2 + (y1 - y0) * 0.48 * y / unit], axis=1))
        rank = report.stats[label]["rank"]
        text.set_text(f"{rank}. {shown.name(label, _panel_chars(n))}  ±{number(scale, 2)}")
    mean_lines.set_segments(segments[0])
    abs_lines.set_segments(segments[1])
    where = "" if idx == min(report.profiles) else f", dataloader {idx}"
    figure.texts[0].set_text(shown.title("profiles along the output", report.step, where))
    return figure


def histograms(Figure: Any, report: Report, reuse: Any = None) -> Any:  # noqa: N803
    """Small multiples of the histograms of the first :data:`PANELS` targets by μ*, each over its own range
    [min, max]: counts per bucket, buckets at their true widths (they widen away from zero). For loggers without
    a histogram type. ``reuse``: a histograms figure of the same targets, redrawn."""
    import numpy as np
    from matplotlib.collections import PolyCollection

    shown = _Shown(report, PANELS)
    n = len(shown.labels)
    if reuse is None:
        figure, axes = _panels(Figure, n, zero=False)
        axes.add_collection(PolyCollection([], facecolors=_MU_COLOR, edgecolors="none"))
        figure.text(0.5, 0.02, "count per bucket; x: from min to max of each target", ha="center", fontsize=8)
    else:
        figure, axes = reuse, reuse.axes[0]
    by_label = dict(zip(report.labels, report.histograms, strict=True))
    polygons = []
    for (x0, y0, x1, y1), label, text in zip(_boxes(n), shown.labels, axes.texts, strict=True):
        hist = by_label[label]
        counts, edges = hist.bins(48) if hist.num > 0 else ([], [0.0])
        span = (edges[-1] - edges[0]) or 1.0
        x = x0 + (x1 - x0) * (np.repeat(edges, 2) - edges[0]) / span
        y = np.concatenate(
            [[0.0], np.repeat(np.asarray(counts, dtype=float) / max(max(counts, default=1), 1), 2), [0.0]]
        )
        polygons.append(np.stack([x, y0 + (y1 - y0) * y], axis=1))
        extent = f"[{number(edges[0], 2)}, {number(edges[-1], 2)}]" if hist.num > 0 else "no finite value"
        text.set_text(f"{report.stats[label]['rank']}. {shown.name(label, _panel_chars(n))}  {extent}")
    axes.collections[-1].set_verts(polygons)
    figure.texts[0].set_text(shown.title("histograms of dy/dθ", report.step))
    return figure


# ---- small multiples on one axes ----------------------------------------------------------------------------
# One axes without ticks holds every panel: a panel is a box in its data coordinates, and all curves are two
# line collections. Separate axes with ticks cost about a text per tick label, three times the whole figure.


def _grid(n: int) -> tuple[int, int, float]:
    """Columns, rows and the width of a panel in inches for ``n`` panels."""
    cols = min(4, n)
    return cols, math.ceil(n / cols), 2.3 if cols == 4 else 7.2 / cols


def _panel_chars(n: int) -> int:
    """How many characters of a label fit above a panel, beside its rank and scale."""
    return max(8, int(_grid(n)[2] / 0.062) - 12)


def _panels(Figure: Any, n: int, zero: bool) -> tuple[Any, Any]:  # noqa: N803
    """A figure of ``n`` empty panels (a frame, a blank label text and, with ``zero``, a dashed line across the
    middle each) and a title."""
    from matplotlib.collections import LineCollection

    cols, rows, cell = _grid(n)
    row = 1.5 if rows > 1 else 2.0
    width, height = cols * cell + 0.3, rows * row + 0.9
    figure = Figure(figsize=(width, height), dpi=_DPI)
    axes = figure.add_axes((0.15 / width, 0.45 / height, cols * cell / width, rows * row / height))
    axes.set_axis_off()
    axes.set_xlim(0, cols)
    axes.set_ylim(0, rows)
    boxes = _boxes(n)
    frames = [[(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)] for x0, y0, x1, y1 in boxes]
    axes.add_collection(LineCollection(frames, colors="0.7", linewidths=0.8))
    if zero:
        zeros = [[(x0, (y0 + y1) / 2), (x1, (y0 + y1) / 2)] for x0, y0, x1, y1 in boxes]
        axes.add_collection(LineCollection(zeros, colors="0.6", linewidths=0.8, linestyles="dashed"))
    for x0, _, _, y1 in boxes:
        axes.text(x0, y1 + 0.03, "", ha="left", va="bottom", fontsize=8)
    _title(figure, height)
    return figure, axes


def _boxes(n: int) -> list[tuple[float, float, float, float]]:
    """``(x0, y0, x1, y1)`` of each panel in the panels' axes, row by row from the top."""
    cols, rows, _ = _grid(n)
    boxes = []
    for i in range(n):
        row, col = divmod(i, cols)
        bottom = rows - 1 - row
        boxes.append((col + 0.03, bottom + 0.06, col + 0.97, bottom + 0.78))
    return boxes


def _envelope(curve: Any) -> tuple[Any, Any]:
    """``x`` in [0, 1] and ``y`` of a curve of any length; a long one as the min and max of
    :data:`_PROFILE_BINS` bins, a single value as a flat line."""
    import numpy as np

    count = curve.size
    if count == 1:
        return np.array([0.0, 1.0]), np.repeat(curve, 2)
    if count <= 2 * _PROFILE_BINS:
        return np.arange(count) / (count - 1), curve
    edges = np.linspace(0, count, _PROFILE_BINS + 1).astype(int)
    low, high = np.fmin.reduceat(curve, edges[:-1]), np.fmax.reduceat(curve, edges[:-1])
    x = np.repeat(edges[:-1] / (count - 1), 2)
    return x, np.stack([low, high], axis=1).reshape(-1)
