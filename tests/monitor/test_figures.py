"""Figures: the ranking, the correlation heatmap and the profiles' small multiples, in real Trainer runs read
back from TensorBoard against the figures drawn afresh from the report; redrawn each epoch; bounded canvases
and texts for a thousand targets, the first targets by μ* said in the title, undefined correlations drawn as
"—"."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sensitivity import SensitivityMonitor
from lightning_sensitivity._report import Report
from tests.helpers import Decay, decoded, inputs, make_trainer, read_text_and_images, report_of, run_decay

pytest.importorskip("matplotlib")
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from lightning_sensitivity._figures import PANELS, TOP, _boxes, correlation, pixels, profiles, ranking  # noqa: E402

#: No figure may be larger than this, in pixels, however many targets there are.
LARGEST = 800


T = 6


class Weights(L.LightningModule):
    """``y = tanh(x W^T) [B, 25]`` with ``W [25, 40]``: a thousand targets, the elements of one weight."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(40, 25)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.fc(x))

    def validation_step(self, batch, batch_idx):
        self.log("val", self(batch[0]).mean())


class Basis(L.LightningModule):
    """``y[i, j] = x_i Σ_m w_m exp(-m t_j)`` over ``t = linspace(0, 1, T)``, plus an offset ``c``:
    ``dy/dw_m = x exp(-m t)`` and ``dy/dc = 1`` (no variance: its correlations are undefined)."""

    def __init__(self, m: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(2.0, 0.5, m))
        self.c = nn.Parameter(torch.tensor(0.25))
        self.register_buffer("basis", torch.exp(-torch.arange(m).reshape(-1, 1) * torch.linspace(0, 1, T)))

    def forward(self, x: Tensor) -> Tensor:
        return x * (self.w @ self.basis) + self.c  # x [B, 1] -> y [B, T]

    def validation_step(self, batch, batch_idx):
        self.log("val", self(batch[0]).mean())


def validate(tmp_path, model: L.LightningModule, monitor: SensitivityMonitor, x: Tensor) -> L.Trainer:
    trainer = L.Trainer(
        logger=TensorBoardLogger(tmp_path, name="tb"),
        callbacks=[monitor],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.validate(model, DataLoader(TensorDataset(x), batch_size=8), verbose=False)
    return trainer


def texts(figure) -> list[Text]:
    """Every text that ``figure`` draws: tick labels, titles, legends and cell values."""
    return [text for text in figure.findobj(Text) if text.get_visible() and text.get_text()]


def synthetic(k: int) -> Report:
    """A report of ``k`` targets ``w[i]`` with distinct μ* (``w[k-1]`` first) and a random correlation."""
    g = torch.Generator().manual_seed(k)
    labels = [f"w[{i}]" for i in range(k)]
    stats = {
        label: {"count": 10, "nonfinite": 0, "mean": 0.1, "std": 0.5, "abs_mean": 1.0 + i, "mean_square": 1.0,
                "min": -1.0, "max": 1.0, "rank": k - i}
        for i, label in enumerate(labels)
    }  # fmt: skip
    corr = torch.corrcoef(torch.randn(k, 64, generator=g, dtype=torch.float64))
    curves = {label: {"mean": torch.randn(T, generator=g), "abs_mean": torch.rand(T, generator=g)} for label in labels}
    return Report(1, labels, stats, corr, 3.0, [], {0: curves})


def test_table_and_figures_in_tensorboard(tmp_path):
    pytest.importorskip("matplotlib")
    monitor = SensitivityMonitor(targets=["A", "k", "b"], profiles=True)
    trainer = run_decay(tmp_path, monitor)
    texts, images = read_text_and_images(trainer.logger.log_dir)
    (step, table), *_ = texts["sensitivity/summary"]
    lines = table.splitlines()
    ranked = [line.split("|")[2].strip(" `") for line in lines if line.startswith("| ") and line[2].isdigit()]
    summary = monitor.summary()
    assert ranked == sorted(summary, key=lambda label: summary[label]["rank"])
    assert "μ\\*" in table and "collinearity index" in table and "poorly identifiable" in table
    assert set(images) == {"sensitivity/ranking", "sensitivity/correlation", "sensitivity/profiles"}
    for tag, events in images.items():
        assert events[0].width > 100 and events[0].height > 100, tag


def histogram_of(values: Tensor):
    """The monitor's histogram of ``values``."""
    from lightning_sensitivity._aggregate import SensitivityAggregator

    aggregator = SensitivityAggregator(num_targets=1)
    aggregator.update(values.double().reshape(1, -1))
    return aggregator.histograms()[0]


def test_redrawn_figures_are_the_figures_drawn_afresh():
    """Figures are built once and redrawn with each epoch's numbers: pixel for pixel what a new one shows,
    though the ranking's order, its scale, the correlations and the profiles all changed."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from lightning_sensitivity._figures import correlation, histograms, pixels, profiles, ranking

    g = torch.Generator().manual_seed(0)

    def curves(scale):
        return {
            label: {"mean": torch.randn(12, generator=g), "abs_mean": torch.rand(12, generator=g) * scale}
            for label in "Akb"
        }

    corr = torch.tensor([[1.0, 0.3, -0.9], [0.3, 1.0, float("nan")], [-0.9, float("nan"), 1.0]], dtype=torch.float64)
    before = report_of([30.0, 10.0, 2.0], [1.0, 5.0, 1.0], torch.eye(3, dtype=torch.float64), 1.0, 5, {0: curves(1)})
    after = report_of([0.01, 4.0, float("nan")], [0.02, 0.9, float("nan")], corr, 12.5, 10, {0: curves(50)})
    for report in (before, after):
        report.histograms = [histogram_of(torch.randn(50, generator=g) * scale) for scale in (1.0, 1e-3, 1e3)]

    def drawn(figure):  # rendered once: a redraw reuses its canvas, renderer and measured texts
        pixels(figure)
        return figure

    for draw in (
        ranking,
        correlation,
        histograms,
        lambda Figure, report, reuse=None: profiles(Figure, report, 0, reuse),
    ):
        fresh = pixels(draw(Figure, after))
        assert (pixels(draw(Figure, after, reuse=drawn(draw(Figure, before)))) == fresh).all(), draw.__name__
        assert not (fresh == pixels(draw(Figure, before))).all(), draw.__name__


def test_figures_of_later_epochs_are_those_of_their_reports(tmp_path):
    """Across epochs of ``fit`` the kept figures are redrawn: the last images in TensorBoard are the figures of
    the last report, drawn afresh."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from lightning_sensitivity._figures import correlation, pixels, profiles, ranking

    class Fitted(Decay):
        def training_step(self, batch, batch_idx):
            return (self(batch[0]) - 1.0).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    monitor = SensitivityMonitor(targets=["A", "k", "b"], profiles=True)
    data = DataLoader(TensorDataset(inputs()), batch_size=8)
    trainer = make_trainer(tmp_path, monitor, max_epochs=3, log_every_n_steps=1)
    trainer.fit(Fitted(), data, data)
    _, images = read_text_and_images(trainer.logger.log_dir)
    report = monitor._results.reports["validate"]
    expected = {
        "sensitivity/ranking": ranking(Figure, report),
        "sensitivity/correlation": correlation(Figure, report),
        "sensitivity/profiles": profiles(Figure, report, 0),
    }
    for tag, figure in expected.items():
        assert [event.step for event in images[tag]] == [3, 6, 9], tag
        last, first = decoded(images[tag][-1]), decoded(images[tag][0])
        assert (last == pixels(figure)).all(), tag
        assert first.shape != last.shape or not (first == last).all(), tag  # the numbers did change


def test_a_thousand_targets_draw_bounded_figures(tmp_path):
    """All 1000 elements of a weight (the finite-difference check off, for time): three figures of bounded size
    that show the first targets by μ* and say so, with the texts of those targets and a few more."""
    names = [f"fc.weight[{i}, {j}]" for i in range(25) for j in range(40)]
    monitor = SensitivityMonitor(targets=names, chunk_size=64, profiles=True, verify=False)
    trainer = validate(tmp_path, Weights(), monitor, torch.randn(16, 40))
    _, images = read_text_and_images(trainer.logger.log_dir)
    assert set(images) == {"sensitivity/ranking", "sensitivity/correlation", "sensitivity/profiles"}
    report = monitor._results.reports["validate"]
    for tag, draw in (("sensitivity/ranking", ranking), ("sensitivity/correlation", correlation)):
        (image,) = images[tag]
        assert image.width <= LARGEST and image.height <= LARGEST, (tag, image.width, image.height)
        figure = draw(Figure, report)
        assert (decoded(image) == pixels(figure)).all(), tag
        assert f"top {TOP} of 1000 elements of fc.weight by μ*" in figure.texts[0].get_text(), tag
        assert len(texts(figure)) <= 2 * TOP + 10, tag  # the texts of the targets shown, and a few more
    (image,) = images["sensitivity/profiles"]
    assert image.width <= LARGEST and image.height <= LARGEST
    figure = profiles(Figure, report, 0)
    assert (decoded(image) == pixels(figure)).all()
    assert f"top {PANELS} of 1000 elements of fc.weight by μ*" in figure.texts[0].get_text()
    assert len(texts(figure)) <= PANELS + 5
    ranked = sorted(report.labels, key=lambda label: report.stats[label]["rank"])
    shown = [label.removeprefix("fc.weight") for label in ranked[:TOP]]
    assert [text.get_text() for text in ranking(Figure, report).axes[0].texts] == shown  # rank 1 at the top


def test_undefined_correlations_are_drawn_as_dashes(tmp_path):
    """An offset ``c`` (dy/dc = 1: no variance) has an undefined correlation of sensitivities with every target: its
    row below the diagonal and its diagonal cell are grey and written "—", never "nan" or "inf"; above the diagonal
    are the correlations of the estimates, defined for ``c``; the collinearity index says what large means."""
    monitor = SensitivityMonitor(targets=["w[0]", "w[1]", "c"])
    trainer = validate(tmp_path, Basis(2), monitor, inputs())
    _, images = read_text_and_images(trainer.logger.log_dir)
    report = monitor._results.reports["validate"]
    assert not torch.isfinite(report.correlation[2]).any()
    figure = correlation(Figure, report)
    (image,) = images["sensitivity/correlation"]
    drawn = decoded(image)
    assert (drawn == pixels(figure)).all()
    axes = figure.axes[0]
    written = [text.get_text() for text in axes.texts]
    rows, columns, cells = written[:3], written[3:6], written[6:]  # row names, column numbers, values
    assert rows == ["w[0]  1", "w[1]  2", "c  3"] and columns == ["1", "2", "3"]
    estimates = monitor.identifiability()["estimate_correlation"]
    assert len(cells) == 9 and cells[6:] == ["—"] * 3
    assert [cells[1], cells[2], cells[5]] == [f"{float(estimates[i, j]):.2f}" for i, j in ((0, 1), (0, 2), (1, 2))]
    assert cells[0] == cells[4] == "1.00"
    assert not any(word in text.get_text().lower() for text in texts(figure) for word in ("nan", "inf"))
    height = drawn.shape[0]
    for i, j in ((2, 0), (2, 1), (2, 2)):  # beside the dash, the cell is the grey of "undefined"
        x, y = axes.transData.transform((j - 0.35, i - 0.35))
        assert tuple(drawn[int(height - y), int(x)]) == (209, 209, 209), (i, j)
    title = figure.texts[0].get_text()
    assert f"collinearity index {report.collinearity:.4g} (> 10–15: poorly identifiable)" in title
    assert "grey: undefined" in figure.texts[1].get_text()


def test_values_are_written_only_in_cells_wide_enough():
    for k, written in ((11, True), (12, False), (TOP, False)):
        axes = correlation(Figure, synthetic(k)).axes[0]
        assert len(axes.texts) == 2 * k + (k * k if written else 0), k  # names, numbers and values
        if written:
            assert axes.get_window_extent().width / k >= 36  # pixels for "-0.00" at 8 pt


def test_ranking_shows_sigma_beside_mu_star():
    """μ* and σ as two bars from zero (a whisker of ± σ about μ* reached below zero)."""
    report = synthetic(3)
    report.stats["w[0]"]["std"] = 5.0  # σ far above μ* = 1
    axes = ranking(Figure, report).axes[0]
    bars = axes.patches
    assert len(bars) == 6 and not axes.collections
    assert all(bar.get_x() == 0.0 and bar.get_width() >= 0.0 for bar in bars)
    assert [bar.get_width() for bar in bars] == [3.0, 2.0, 1.0, 0.5, 0.5, 5.0]
    assert [text.get_text() for text in axes.texts] == ["[2]", "[1]", "[0]"]


def test_profiles_are_one_figure_of_small_multiples_of_the_first_targets(tmp_path):
    """Twenty targets: one figure with a panel for each of the first 16 by μ*, in rank order, each curve the
    target's profile on the panel's own symmetric scale, and per-target figures no more."""
    names = [f"w[{m}]" for m in range(20)]
    monitor = SensitivityMonitor(targets=names, profiles=True)
    trainer = validate(tmp_path, Basis(20), monitor, inputs())
    _, images = read_text_and_images(trainer.logger.log_dir)
    assert sorted(images) == ["sensitivity/correlation", "sensitivity/profiles", "sensitivity/ranking"]
    report = monitor._results.reports["validate"]
    figure = profiles(Figure, report, 0)
    (image,) = images["sensitivity/profiles"]
    assert (decoded(image) == pixels(figure)).all()
    assert f"top {PANELS} of 20 elements of w by μ*" in figure.texts[0].get_text()
    axes = figure.axes[0]
    summary = monitor.summary()
    ranked = sorted(names, key=lambda label: summary[label]["rank"])[:PANELS]
    panels = [text.get_text() for text in axes.texts]
    assert [text.split("  ")[0] for text in panels] == [f"{r + 1}. {label[1:]}" for r, label in enumerate(ranked)]
    abs_lines, mean_lines = axes.collections[-2:]
    segments = mean_lines.get_segments(), abs_lines.get_segments()
    for box, label, text, mean, absolute in zip(_boxes(PANELS), ranked, panels, *segments, strict=True):
        x0, y0, x1, y1 = box
        profile = monitor.profiles()[label]
        scale = max(profile["mean"].abs().max(), profile["abs_mean"].abs().max()).item()
        assert text.endswith(f"±{scale:.2g}")
        for segment, expected in ((mean, profile["mean"]), (absolute, profile["abs_mean"])):
            x, y = torch.from_numpy(segment).double().unbind(1)
            torch.testing.assert_close(x, torch.linspace(x0, x1, T, dtype=torch.float64))
            value = (y - (y0 + y1) / 2) / (0.48 * (y1 - y0)) * scale  # the panel's scale undone
            torch.testing.assert_close(value, expected.double(), rtol=1e-5, atol=1e-7)


def test_long_names_and_many_targets_keep_the_largest_canvas():
    """Long labels of many tensors are shortened in the middle (their index stays): no canvas grows past the
    largest, however long the names or many the targets."""
    report = synthetic(300)
    long = {label: f"encoder.layers.{i}.self_attention.in_proj_weight[{i}, 7]" for i, label in enumerate(report.labels)}
    report.labels = [long[label] for label in report.labels]
    report.stats = {long[label]: stats for label, stats in report.stats.items()}
    report.profiles = {0: {long[label]: curve for label, curve in report.profiles[0].items()}}
    for figure in (ranking(Figure, report), correlation(Figure, report), profiles(Figure, report, 0)):
        width, height = figure.get_size_inches() * figure.dpi
        assert width <= LARGEST and height <= LARGEST
        assert pixels(figure).shape == (round(height), round(width), 3)
    names = [text.get_text() for text in ranking(Figure, report).axes[0].texts]
    assert names[0] == "encoder.layer…weight[299, 7]" and all(len(name) <= 28 for name in names)
    assert "top 20 of 300 targets by μ*" in ranking(Figure, report).texts[0].get_text()
