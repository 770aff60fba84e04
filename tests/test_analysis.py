"""Sensitivity analysis as scientists read it: normalised sensitivities, the importance ranking, profiles along
the output and the identifiability of the targets, against closed forms, in real Trainer runs read back from
TensorBoard."""

from __future__ import annotations

import importlib.util
import math
import sys
import warnings

import lightning as L
import pytest
import torch
from conftest import assert_histogram, expected_stats, read_events, read_text_and_images
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sensitivity import SensitivityMonitor, per_sample_sensitivities
from lightning_sensitivity._report import markdown

T = 6


class Decay(L.LightningModule):
    """``y[i, j] = A exp(-k t_j) x_i + b x_i`` over ``t = linspace(0, 1, T)``:
    ``dy/dA = exp(-k t) x``, ``dy/dk = -A t exp(-k t) x``, ``dy/db = x``."""

    def __init__(self, a: float = 2.0, k: float = 0.7, b: float = 0.3):
        super().__init__()
        self.A = nn.Parameter(torch.tensor(a))
        self.k = nn.Parameter(torch.tensor(k))
        self.b = nn.Parameter(torch.tensor(b))
        self.register_buffer("t", torch.linspace(0, 1, T))

    def forward(self, x: Tensor) -> Tensor:
        return self.A * torch.exp(-self.k * self.t) * x + self.b * x  # x [B, 1] -> y [B, T]

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.log("val", self(batch[0]).mean())

    test_step = validation_step

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        return self(batch[0])

    def analytic(self, x: Tensor) -> dict[str, Tensor]:
        a, k, t, x = self.A.item(), self.k.item(), self.t.double(), x.double()
        decay = torch.exp(-k * t)
        return {"A": decay * x, "k": -a * t * decay * x, "b": x.expand(-1, T)}


def inputs(n: int = 20, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, generator=g, dtype=torch.float64).float()


def make_trainer(tmp_path, monitor, **kwargs) -> L.Trainer:
    """A quiet Trainer with ``monitor`` and a TensorBoard logger under ``tmp_path/tb``; ``kwargs`` override."""
    defaults = dict(
        logger=TensorBoardLogger(tmp_path, name="tb"),
        callbacks=[monitor],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    return L.Trainer(**{**defaults, **kwargs})


def run(tmp_path, monitor, x=None, how="validate", **kwargs) -> L.Trainer:
    x = inputs() if x is None else x
    trainer = make_trainer(tmp_path, monitor, **kwargs)
    getattr(trainer, how)(Decay(), DataLoader(TensorDataset(x), batch_size=8))
    return trainer


def collinearity_reference(columns: list[Tensor]) -> float:
    s = torch.stack([c.reshape(-1).double() for c in columns], 1)
    s = s / s.norm(dim=0)
    return float(torch.linalg.eigvalsh(s.T @ s)[0].rsqrt())


def test_mean_square_ranking_correlation_and_collinearity_match_closed_forms(tmp_path):
    x = inputs()
    monitor = SensitivityMonitor(targets=["A", "k", "b"])
    trainer = run(tmp_path, monitor, x)
    exact = Decay().analytic(x)
    _, scalars = read_events(trainer.logger.log_dir)
    summary = monitor.summary()
    for label, values in exact.items():
        stats = expected_stats(values)
        (scalar,) = scalars[f"sensitivity/{label}/mean_square"]
        assert scalar.value == pytest.approx(stats["mean_square"], rel=1e-5)
        assert trainer.callback_metrics[f"sensitivity/{label}/mean_square"].item() == pytest.approx(scalar.value)
        for key in ("mean", "std", "abs_mean", "mean_square", "min", "max"):
            assert summary[label][key] == pytest.approx(stats[key], rel=1e-6, abs=1e-9), (label, key)
        assert summary[label]["count"] == 20 * T and summary[label]["nonfinite"] == 0
        assert isinstance(summary[label]["count"], int) and isinstance(summary[label]["mean"], float)
    order = sorted(exact, key=lambda label: -float(exact[label].abs().mean()))
    assert [summary[label]["rank"] for label in order] == [1, 2, 3]

    labels, corr = monitor.correlation()
    assert labels == ["A", "k", "b"] and corr.shape == (3, 3) and corr.dtype == torch.float64
    expected = torch.corrcoef(torch.stack([exact[label].reshape(-1) for label in labels]))
    torch.testing.assert_close(corr, expected, rtol=1e-6, atol=1e-9)
    (gamma,) = scalars["sensitivity/collinearity"]
    assert gamma.value == pytest.approx(collinearity_reference(list(exact.values())), rel=1e-4)


def test_table_and_figures_in_tensorboard(tmp_path):
    pytest.importorskip("matplotlib")
    monitor = SensitivityMonitor(targets=["A", "k", "b"], profiles=True)
    trainer = run(tmp_path, monitor)
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


def test_table_has_short_columns_and_counts_once(tmp_path):
    """Short headers that do not wrap inside a word; counts that are the same for every target are said once,
    above the table, and get a column where they differ; NaN is written "—"."""
    texts, _ = read_text_and_images(
        run(tmp_path, SensitivityMonitor(["A", "k", "b"], log_figures=False)).logger.log_dir
    )
    (_, table), *_ = texts["sensitivity/summary"]
    header = next(line for line in table.splitlines() if line.startswith("| #"))
    assert header == "| # | target | μ\\* | σ | mean | ν | min | max |"
    assert "120 values and 0 non-finite each" in table
    differ = report_of([3.0, float("nan"), 1.0], [1.0, float("nan"), 1.0], torch.eye(3), 1.0, step=2)
    differ.stats["k"].update(count=0, nonfinite=120, min=float("nan"), max=float("nan"))
    table = markdown(differ, "sensitivity")
    assert "| # | target | μ\\* | σ | mean | ν | min | max | n | nonfinite |" in table
    assert table.splitlines()[-1] == "| 3 | `k` | — | — | 0.5 | 1 | — | — | 0 | 120 |"
    assert "nan" not in table


def report_of(abs_mean: list[float], std: list[float], corr: Tensor, collinearity: float, step: int, profiles=None):
    """A report of targets ``A``, ``k``, ``b`` with these μ*, σ and correlation (the ranking follows μ*), and
    ``profiles`` (``{dataloader_idx: {label: {"mean", "abs_mean"}}}``)."""
    from lightning_sensitivity._report import Report

    labels = ["A", "k", "b"]
    order = sorted(range(3), key=lambda i: -abs_mean[i] if not math.isnan(abs_mean[i]) else math.inf)
    stats = {
        label: {"count": 10, "nonfinite": 0, "mean": 0.5, "std": std[i], "abs_mean": abs_mean[i],
                "mean_square": 1.0, "min": -1.0, "max": 1.0, "rank": order.index(i) + 1}
        for i, label in enumerate(labels)
    }  # fmt: skip
    return Report(step, labels, stats, corr, collinearity, [], profiles or {})


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


def histogram_of(values: Tensor):
    """The monitor's histogram of ``values``."""
    from lightning_sensitivity._aggregate import SensitivityAggregator

    aggregator = SensitivityAggregator(num_targets=1)
    aggregator.update(values.double().reshape(1, -1))
    return aggregator.histograms()[0]


def decoded(image_event):
    """The RGB pixels of an image read back from TensorBoard."""
    import io

    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(image_event.encoded_image_string)).convert("RGB"))


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


def test_without_matplotlib_one_warning_and_the_rest_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    monkeypatch.setattr("lightning_sensitivity._publish.matplotlib_available", lambda: False)
    with pytest.warns(UserWarning, match="lightning-sensitivity\\[plots\\]") as record:
        trainer = run(tmp_path, SensitivityMonitor(targets=["A", "k"]))
    assert len([w for w in record if "matplotlib" in str(w.message)]) == 1
    texts, images = read_text_and_images(trainer.logger.log_dir)
    assert "sensitivity/summary" in texts and not images
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        run(tmp_path, SensitivityMonitor(targets=["A", "k"], log_figures=False))


@pytest.mark.parametrize("method", ["auto", "reverse"])
def test_profiles_along_the_trajectory(tmp_path, method):
    x = inputs()
    monitor = SensitivityMonitor(targets=["A", "k"], profiles=True, reduction="norm", method=method)
    run(tmp_path, monitor, x)
    exact = Decay().analytic(x)
    profiles = monitor.profiles()
    for label in ("A", "k"):
        assert profiles[label]["mean"].shape == (T,)
        torch.testing.assert_close(profiles[label]["mean"], exact[label].mean(0), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(profiles[label]["abs_mean"], exact[label].abs().mean(0), rtol=1e-6, atol=1e-9)
    with pytest.raises(KeyError, match="dataloader_idx=1"):
        monitor.profiles(dataloader_idx=1)


def test_normalize_relative_is_the_elasticity_and_counts_zero_outputs(tmp_path):
    x = inputs()
    x[3] = 0.0  # y = 0 for sample 3: its relative sensitivities are not finite
    monitor = SensitivityMonitor(targets=["A", "k"], normalize="relative", profiles=True)
    trainer = run(tmp_path, monitor, x)
    model = Decay()
    y = model(x).detach().double()
    exact = model.analytic(x)
    relative = {"A": 2.0 / y * exact["A"], "k": 0.7 / y * exact["k"]}
    histograms, scalars = read_events(trainer.logger.log_dir)
    summary = monitor.summary()
    for label, values in relative.items():
        stats = expected_stats(values)
        assert stats["nonfinite"] == T
        assert_histogram(histograms[f"sensitivity/{label}"][0], stats)
        assert summary[label]["nonfinite"] == T and summary[label]["count"] == 19 * T
        assert summary[label]["mean_square"] == pytest.approx(stats["mean_square"], rel=1e-6)
        (nonfinite,) = scalars[f"sensitivity/{label}/nonfinite"]
        assert nonfinite.value == T
    # closed forms: the elasticity of y to A is A exp(-k t) / (A exp(-k t) + b), the same for every sample
    t, decay = model.t.double(), torch.exp(-0.7 * model.t.double())
    elasticity = 2.0 * decay / (2.0 * decay + 0.3)
    torch.testing.assert_close(monitor.profiles()["A"]["mean"], elasticity, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(monitor.profiles()["k"]["mean"], -0.7 * t * elasticity, rtol=1e-6, atol=1e-9)
    labels, corr = monitor.correlation()  # the NaN rows of sample 3 are left out
    finite = torch.isfinite(relative["A"]).all(1)
    expected = torch.corrcoef(torch.stack([relative[label][finite].reshape(-1) for label in labels]))
    torch.testing.assert_close(corr, expected, rtol=1e-6, atol=1e-9)


def test_normalize_parameter_is_theta_times_the_derivative(tmp_path):
    x = inputs()
    monitor = SensitivityMonitor(targets=["A", "k"], normalize="parameter")
    run(tmp_path, monitor, x)
    exact = Decay().analytic(x)
    summary = monitor.summary()
    for label, theta in (("A", 2.0), ("k", 0.7)):
        stats = expected_stats(theta * exact[label])
        assert summary[label]["mean"] == pytest.approx(stats["mean"], rel=1e-6)
        assert summary[label]["std"] == pytest.approx(stats["std"], rel=1e-6)


@pytest.mark.parametrize("normalize", ["none", "parameter", "relative"])
def test_function_normalize(normalize):
    model = Decay()
    x = inputs()
    with torch.inference_mode():
        sens = per_sample_sensitivities(model, ["A", "k"], (x,), normalize=normalize)
    exact = model.analytic(x)
    y = model(x).detach().double()
    for label, theta in (("A", 2.0), ("k", 0.7)):
        factor = {"none": 1.0, "parameter": theta, "relative": theta / y}[normalize]
        torch.testing.assert_close(sens[label].double(), factor * exact[label], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="normalize"):
        per_sample_sensitivities(model, "A", (x,), normalize="log")


def test_nan_samples_are_left_out_of_every_statistic_and_counted(tmp_path):
    x = inputs()
    x[5] = float("nan")
    monitor = SensitivityMonitor(targets=["A", "k", "b"], profiles=True, verify=False)
    trainer = run(tmp_path, monitor, x)
    exact = Decay().analytic(x)
    summary = monitor.summary()
    finite = torch.isfinite(x[:, 0])
    for label, values in exact.items():
        assert summary[label]["nonfinite"] == T and summary[label]["count"] == 19 * T
        clean = values[finite]
        assert summary[label]["mean_square"] == pytest.approx(float(clean.square().mean()), rel=1e-6)
        torch.testing.assert_close(monitor.profiles()[label]["mean"], clean.mean(0), rtol=1e-6, atol=1e-9)
    labels, corr = monitor.correlation()
    expected = torch.corrcoef(torch.stack([exact[label][finite].reshape(-1) for label in labels]))
    torch.testing.assert_close(corr, expected, rtol=1e-6, atol=1e-9)
    _, scalars = read_events(trainer.logger.log_dir)
    clean = [exact[label][finite] for label in labels]
    assert scalars["sensitivity/collinearity"][0].value == pytest.approx(collinearity_reference(clean), rel=1e-4)


def test_a_target_without_a_finite_value_has_nan_statistics(tmp_path):
    monitor = SensitivityMonitor(targets=["A", "k"], normalize="relative", log_figures=False)
    run(tmp_path, monitor, torch.zeros_like(inputs()))  # y = 0 everywhere: no relative sensitivity is finite
    summary = monitor.summary()
    for stats in summary.values():
        assert (stats["count"], stats["nonfinite"]) == (0, 20 * T)
        assert all(math.isnan(stats[name]) for name in ("mean", "std", "abs_mean", "mean_square", "min", "max"))
    assert sorted(stats["rank"] for stats in summary.values()) == [1, 2]


def test_collinear_targets_are_flagged(tmp_path):
    """A and b enter only as (A exp(-k t) + b) x: at k = 0 they cannot be told apart."""
    monitor = SensitivityMonitor(targets=["A", "b"])
    x = inputs()
    trainer = L.Trainer(
        logger=TensorBoardLogger(tmp_path), callbacks=[monitor], enable_progress_bar=False, enable_model_summary=False
    )
    trainer.validate(Decay(k=0.0), DataLoader(TensorDataset(x), batch_size=8))
    _, corr = monitor.correlation()
    assert corr[0, 1] == pytest.approx(1.0, abs=1e-9)
    assert math.isinf(trainer.callback_metrics["sensitivity/collinearity"].item()) or (
        trainer.callback_metrics["sensitivity/collinearity"].item() > 1e6
    )


def test_profiles_per_dataloader_with_different_shapes(tmp_path):
    class TwoShapes(Decay):
        def sensitivity_step(self, batch, batch_idx, dataloader_idx=0):
            y = self(batch[0])
            return y if dataloader_idx == 0 else y[:, :2]

    x = inputs()
    monitor = SensitivityMonitor(targets=["A"], profiles=True)
    trainer = L.Trainer(
        logger=TensorBoardLogger(tmp_path), callbacks=[monitor], enable_progress_bar=False, enable_model_summary=False
    )
    loaders = [DataLoader(TensorDataset(x), batch_size=8), DataLoader(TensorDataset(x[:10]), batch_size=8)]
    trainer.validate(TwoShapes(), loaders)
    exact = Decay().analytic(x)["A"]
    torch.testing.assert_close(monitor.profiles()["A"]["mean"], exact.mean(0), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(monitor.profiles(1)["A"]["mean"], exact[:10, :2].mean(0), rtol=1e-6, atol=1e-9)
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from lightning_sensitivity._figures import pixels, profiles

    _, images = read_text_and_images(trainer.logger.log_dir)
    report = monitor._results.reports["validate"]
    for tag, idx in (("sensitivity/profiles", 0), ("sensitivity/profiles/dataloader_1", 1)):
        (image,) = images[tag]
        assert (decoded(image) == pixels(profiles(Figure, report, idx))).all(), tag
    assert "dataloader 1" in profiles(Figure, report, 1).texts[0].get_text()


def test_profiles_are_those_of_the_dataloaders_the_epoch_ran(tmp_path):
    """With ``reload_dataloaders_every_n_epochs``, an epoch without dataloader 1 has no profile of it (rather
    than the earlier epoch's, emptied to NaN) and draws none."""
    x = inputs()

    class Fewer(Decay):
        def training_step(self, batch, batch_idx):
            return 0.0 * self(batch[0]).sum()

        def train_dataloader(self):
            return DataLoader(TensorDataset(x), batch_size=8)

        def val_dataloader(self):
            loaders = [DataLoader(TensorDataset(x), batch_size=8), DataLoader(TensorDataset(2 * x[:10]), batch_size=8)]
            return loaders if self.current_epoch == 0 else loaders[:1]

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    monitor = SensitivityMonitor(targets=["A"], profiles=True)
    trainer = make_trainer(tmp_path, monitor, max_epochs=2, reload_dataloaders_every_n_epochs=1)
    trainer.fit(Fewer())
    with pytest.raises(KeyError, match=r"dataloaders \[0\]"):
        monitor.profiles(1)
    torch.testing.assert_close(monitor.profiles(0)["A"]["mean"], Decay().analytic(x)["A"].mean(0), rtol=1e-6, atol=1e-9)
    if importlib.util.find_spec("matplotlib") is not None:
        _, images = read_text_and_images(trainer.logger.log_dir)
        assert len(images["sensitivity/profiles"]) == 2 and len(images["sensitivity/profiles/dataloader_1"]) == 1


def test_profile_size_bound_is_checked_before_the_first_training_step(tmp_path):
    class Wide(Decay):
        def training_step(self, batch, batch_idx):
            raise AssertionError("no training step may run")

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    monitor = SensitivityMonitor(targets=["A", "k"], profiles=True, max_profile_elements=2 * T - 1)
    trainer = L.Trainer(
        logger=False, callbacks=[monitor], max_epochs=1, enable_progress_bar=False, enable_model_summary=False
    )
    data = DataLoader(TensorDataset(inputs()), batch_size=8)
    with pytest.raises(ValueError, match="2 targets × an output of shape \\(6,\\).*= 12.*max_profile_elements=11"):
        trainer.fit(Wide(), data, data)


def test_new_statistics_reach_every_logger(tmp_path):
    monitor = SensitivityMonitor(targets=["A", "k"], log_histograms=False)
    run(tmp_path, monitor, logger=CSVLogger(tmp_path))
    text = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "sensitivity/A/mean_square" in text and "sensitivity/collinearity" in text


def test_methods_before_any_epoch_and_without_profiles():
    monitor = SensitivityMonitor(targets="A")
    for call in (monitor.summary, monitor.correlation):
        with pytest.raises(RuntimeError, match="no epoch has been logged yet"):
            call()
    with pytest.raises(RuntimeError, match="profiles=True"):
        monitor.profiles()


def test_bad_analysis_arguments():
    with pytest.raises(ValueError, match="normalize"):
        SensitivityMonitor(targets="A", normalize="log")
    with pytest.raises(ValueError, match="max_profile_elements"):
        SensitivityMonitor(targets="A", max_profile_elements=0)
    with pytest.raises(ValueError, match="stages"):
        SensitivityMonitor(targets="A", stages=["train"])
