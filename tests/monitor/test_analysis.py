"""Sensitivity analysis as scientists read it: normalised sensitivities, the importance ranking, the summary
table and the identifiability of the targets, against closed forms (the ``Decay`` of ``tests.helpers``), in
real Trainer runs read back from TensorBoard."""

from __future__ import annotations

import math
import sys
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_sensitivity import SensitivityMonitor
from lightning_sensitivity._report import markdown
from tests.helpers import (
    Decay,
    T,
    assert_histogram,
    expected_stats,
    inputs,
    read_events,
    read_text_and_images,
    report_of,
    run_decay,
)


def collinearity_reference(columns: list[Tensor]) -> float:
    s = torch.stack([c.reshape(-1).double() for c in columns], 1)
    s = s / s.norm(dim=0)
    return float(torch.linalg.eigvalsh(s.T @ s)[0].rsqrt())


def test_mean_square_ranking_correlation_and_collinearity_match_closed_forms(tmp_path):
    x = inputs()
    monitor = SensitivityMonitor(targets=["A", "k", "b"])
    trainer = run_decay(tmp_path, monitor, x)
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


def test_table_has_short_columns_and_counts_once(tmp_path):
    """Short headers that do not wrap inside a word; counts that are the same for every target are said once,
    above the table, and get a column where they differ; NaN is written "—"."""
    texts, _ = read_text_and_images(
        run_decay(tmp_path, SensitivityMonitor(["A", "k", "b"], log_figures=False)).logger.log_dir
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


def test_without_matplotlib_one_warning_and_the_rest_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    monkeypatch.setattr("lightning_sensitivity._publish.matplotlib_available", lambda: False)
    with pytest.warns(UserWarning, match="lightning-sensitivity\\[plots\\]") as record:
        trainer = run_decay(tmp_path, SensitivityMonitor(targets=["A", "k"]))
    assert len([w for w in record if "matplotlib" in str(w.message)]) == 1
    texts, images = read_text_and_images(trainer.logger.log_dir)
    assert "sensitivity/summary" in texts and not images
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        run_decay(tmp_path, SensitivityMonitor(targets=["A", "k"], log_figures=False))


def test_normalize_relative_is_the_elasticity_and_counts_zero_outputs(tmp_path):
    x = inputs()
    x[3] = 0.0  # y = 0 for sample 3: its relative sensitivities are not finite
    monitor = SensitivityMonitor(targets=["A", "k"], normalize="relative", profiles=True)
    trainer = run_decay(tmp_path, monitor, x)
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
    run_decay(tmp_path, monitor, x)
    exact = Decay().analytic(x)
    summary = monitor.summary()
    for label, theta in (("A", 2.0), ("k", 0.7)):
        stats = expected_stats(theta * exact[label])
        assert summary[label]["mean"] == pytest.approx(stats["mean"], rel=1e-6)
        assert summary[label]["std"] == pytest.approx(stats["std"], rel=1e-6)


def test_nan_samples_are_left_out_of_every_statistic_and_counted(tmp_path):
    x = inputs()
    x[5] = float("nan")
    monitor = SensitivityMonitor(targets=["A", "k", "b"], profiles=True, verify=False)
    trainer = run_decay(tmp_path, monitor, x)
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
    run_decay(tmp_path, monitor, torch.zeros_like(inputs()))  # y = 0 everywhere: no relative sensitivity is finite
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


class Logistic(L.LightningModule):
    """``y(t) = K / (1 + exp(-r (t - 5))) + b`` at 12 times per sample, each sample shifted in time."""

    def __init__(self) -> None:
        super().__init__()
        self.K = nn.Parameter(torch.tensor(2.0))
        self.r = nn.Parameter(torch.tensor(0.5))
        self.b = nn.Parameter(torch.tensor(0.1))

    def forward(self, shift: Tensor) -> Tensor:
        t = torch.linspace(0, 10, 12) + shift[:, None]
        return self.K / (1 + torch.exp(-self.r * (t - 5))) + self.b

    def training_step(self, batch, batch_idx):
        shift, y = batch
        return F.mse_loss(self(shift), y)

    def validation_step(self, batch, batch_idx):
        shift, y = batch
        self.log("val_loss", F.mse_loss(self(shift), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


def test_the_correlation_of_an_offset_is_undefined_in_a_fit(tmp_path):
    g = torch.Generator().manual_seed(0)
    shift = torch.rand(96, generator=g)
    with torch.no_grad():
        y = Logistic().eval()(shift) * 1.5 + 0.05 * torch.randn(96, 12, generator=g)
    data = TensorDataset(shift, y)
    torch.manual_seed(0)
    monitor = SensitivityMonitor(["K", "r", "b"], profiles=True, log_histograms=False, log_figures=False)
    trainer = L.Trainer(
        max_epochs=8,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor],
        default_root_dir=tmp_path,
    )
    trainer.fit(Logistic(), DataLoader(data, batch_size=16), DataLoader(data, batch_size=16))
    labels, r = monitor.correlation()
    b = labels.index("b")
    assert r[b].isnan().all() and r[:, b].isnan().all()
    others = [labels.index("K"), labels.index("r")]
    assert torch.isfinite(r[others][:, others]).all()
    summary = monitor.summary()
    assert summary["b"]["std"] == 0.0 and summary["b"]["mean"] == 1.0 and summary["K"]["std"] > 0
    assert not any(math.isinf(v) for row in summary.values() for v in row.values())
