"""The monitor's Fisher information, covariance, standard errors and identifiability in a real Trainer, against
``scipy.optimize.curve_fit``'s ``pcov``, explicit inverses of JᵀJ and read back from TensorBoard."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sensitivity import SensitivityMonitor, predictive_std
from tests.helpers import read_events, read_text_and_images, trainer

D = torch.float64
SIGMA = 0.05


class Curve(L.LightningModule):
    """``y(t) = K / (1 + exp(-r (t - 5))) + b`` for a batch of times ``t [B]``."""

    def __init__(self, K: float = 1.0, r: float = 1.0, b: float = 0.0) -> None:
        super().__init__()
        self.K = nn.Parameter(torch.tensor(K, dtype=D))
        self.r = nn.Parameter(torch.tensor(r, dtype=D))
        self.b = nn.Parameter(torch.tensor(b, dtype=D))

    def forward(self, t: Tensor) -> Tensor:
        return self.K / (1 + torch.exp(-self.r * (t - 5))) + self.b

    def validation_step(self, batch, batch_idx):
        self.log("val", self(batch[0]).mean())


def observed() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    t = np.linspace(0, 10, 40)
    return t, 2.0 / (1 + np.exp(-0.8 * (t - 5))) + 0.1 + SIGMA * rng.standard_normal(40)


def jacobian(t: np.ndarray, K: float, r: float, b: float) -> np.ndarray:
    e = np.exp(-r * (t - 5))
    g = 1 / (1 + e)
    return np.stack([g, K * (t - 5) * e * g**2, np.ones_like(t)], 1)


def validate(tmp_path, model: L.LightningModule, monitor: SensitivityMonitor, *data: Tensor) -> L.Trainer:
    t = trainer(tmp_path, monitor)
    t.validate(model, DataLoader(TensorDataset(*data), batch_size=8))
    return t


def test_covariance_at_a_least_squares_optimum_is_curve_fits_pcov(tmp_path):
    scipy = pytest.importorskip("scipy.optimize")
    t, y = observed()

    def f(t, K, r, b):
        return K / (1 + np.exp(-r * (t - 5))) + b

    tight = {"ftol": 1e-15, "xtol": 1e-15, "gtol": 1e-15}
    p, pcov = scipy.curve_fit(
        f, t, y, p0=[1, 1, 0], jac=jacobian, sigma=np.full(40, SIGMA), absolute_sigma=True, **tight
    )
    monitor = SensitivityMonitor(["K", "r", "b"], noise_std=SIGMA, log_figures=False)
    validate(tmp_path, Curve(*p), monitor, torch.tensor(t))  # the validation data are the fit's
    labels, sigma = monitor.covariance()
    assert labels == ["K", "r", "b"]
    np.testing.assert_allclose(sigma.numpy(), pcov, rtol=2e-5, atol=0)
    j = jacobian(t, *p)
    np.testing.assert_allclose(sigma.numpy(), np.linalg.inv(j.T @ j / SIGMA**2), rtol=1e-9)
    scale = np.abs(j.T @ j).max()
    np.testing.assert_allclose(
        monitor.fisher()[1].numpy(), j.T @ j / SIGMA**2, rtol=1e-12, atol=1e-12 * scale / SIGMA**2
    )
    np.testing.assert_allclose(monitor.fisher(noise_std=1.0)[1].numpy(), j.T @ j, rtol=1e-12, atol=1e-12 * scale)
    summary = monitor.summary()
    for i, label in enumerate(labels):
        assert summary[label]["stderr"] == pytest.approx(math.sqrt(pcov[i, i]), rel=1e-5)
    sub_labels, sub = monitor.covariance(targets=["r", "K"])  # the others held fixed
    assert sub_labels == ["r", "K"]
    np.testing.assert_allclose(sub.numpy(), np.linalg.inv((j.T @ j / SIGMA**2)[np.ix_([1, 0], [1, 0])]), rtol=1e-9)
    with pytest.raises(KeyError, match="not among the monitor's labels"):
        monitor.covariance(targets=["k"])
    report = monitor.identifiability()
    assert set(report) >= {"labels", "eigenvalues", "eigenvectors", "subsets", "verdicts", "estimate_correlation"}
    expected = np.linalg.eigvalsh(np.diag(p) @ (j.T @ j) @ np.diag(p))
    np.testing.assert_allclose(report["eigenvalues"].numpy(), expected, rtol=1e-9)
    estimates = report["estimate_correlation"].numpy()
    np.testing.assert_allclose(estimates, pcov / np.sqrt(np.outer(np.diag(pcov), np.diag(pcov))), rtol=1e-4)
    std = predictive_std(monitor_sensitivities(Curve(*p), t), monitor.covariance())
    np.testing.assert_allclose(std.numpy(), np.sqrt(np.einsum("ni,ij,nj->n", j, pcov, j)), rtol=1e-4)


def monitor_sensitivities(model: nn.Module, t: np.ndarray) -> dict[str, Tensor]:
    from lightning_sensitivity import per_sample_sensitivities

    return per_sample_sensitivities(model, ["K", "r", "b"], (torch.tensor(t),))


def test_standard_errors_are_logged_with_noise_std_and_nan_without(tmp_path):
    t, _ = observed()
    with_noise = SensitivityMonitor(["K", "r", "b"], noise_std=SIGMA, log_figures=False)
    logged = validate(tmp_path / "with", Curve(2.0, 0.8, 0.1), with_noise, torch.tensor(t))
    _, scalars = read_events(logged.logger.log_dir)
    for label, stats in with_noise.summary().items():
        assert scalars[f"sensitivity/{label}/stderr"][-1].value == pytest.approx(stats["stderr"], rel=1e-6)
    texts, _ = read_text_and_images(logged.logger.log_dir)
    ((step, text),) = texts["sensitivity/identifiability"]
    assert "identifiability of 3 targets" in text and "Every target is determined" in text
    without = SensitivityMonitor(["K", "r", "b"], log_figures=False)
    plain = validate(tmp_path / "without", Curve(2.0, 0.8, 0.1), without, torch.tensor(t))
    assert all(math.isnan(stats["stderr"]) for stats in without.summary().values())
    assert not any(tag.endswith("/stderr") for tag in read_events(plain.logger.log_dir)[1])
    torch.testing.assert_close(without.fisher(noise_std=SIGMA)[1], with_noise.fisher()[1])  # σ: the argument's
    with pytest.raises(ValueError, match=r"SensitivityMonitor\(noise_std=...\)"):
        SensitivityMonitor("K", noise_std=0.0)


@pytest.mark.parametrize("normalize", ["parameter", "relative"])
def test_the_information_is_of_raw_derivatives_whatever_normalize(tmp_path, normalize):
    t, _ = observed()
    raw = SensitivityMonitor(["K", "r", "b"], noise_std=SIGMA, log_figures=False)
    scaled = SensitivityMonitor(["K", "r", "b"], noise_std=SIGMA, normalize=normalize, prefix="n", log_figures=False)
    validate(tmp_path, Curve(2.0, 0.8, 0.1), [raw, scaled][0], torch.tensor(t))
    validate(tmp_path / "n", Curve(2.0, 0.8, 0.1), scaled, torch.tensor(t))
    torch.testing.assert_close(scaled.fisher()[1], raw.fisher()[1], rtol=1e-12, atol=0)
    assert scaled.summary()["K"]["mean"] != pytest.approx(raw.summary()["K"]["mean"])  # the values are normalised


class HalfNaN(Curve):
    def forward(self, t: Tensor) -> Tensor:
        y = super().forward(t)
        return torch.where(t > 8, torch.full_like(y, math.nan) * self.K, y)


def test_samples_with_non_finite_values_are_left_out_of_the_information_and_counted(tmp_path):
    t, _ = observed()
    monitor = SensitivityMonitor(["K", "r", "b"], noise_std=SIGMA, log_figures=False, verify=False)
    validate(tmp_path, HalfNaN(2.0, 0.8, 0.1), monitor, torch.tensor(t))
    kept = t[t <= 8]
    j = jacobian(kept, 2.0, 0.8, 0.1)
    scale = np.abs(j.T @ j).max() / SIGMA**2
    np.testing.assert_allclose(monitor.fisher()[1].numpy(), j.T @ j / SIGMA**2, rtol=1e-12, atol=1e-12 * scale)
    assert monitor.summary()["K"]["nonfinite"] == int((t > 8).sum())


class BesideANetwork(L.LightningModule):
    """``y = C · x + net(x)`` (``absorbs``: ``y = C + net(x)``, where the net's last bias can take C's place)."""

    def __init__(self, absorbs: bool) -> None:
        super().__init__()
        torch.manual_seed(5)  # a network whose 7 weights the data determine (its information has full rank)
        self.C = nn.Parameter(torch.tensor(1.5, dtype=D))
        self.net = nn.Sequential(nn.Linear(1, 2), nn.Tanh(), nn.Linear(2, 1)).double()
        with torch.no_grad():
            self.net[0].weight.mul_(2.0)
        self.absorbs = absorbs

    def forward(self, x: Tensor) -> Tensor:
        return (self.C if self.absorbs else self.C * x) + self.net(x)

    def validation_step(self, batch, batch_idx):
        self.log("val", self(batch[0]).mean())


TARGETS = ["C", "net.*.weight[...]", "net.*.bias[...]"]


def test_a_constant_beside_every_weight_of_a_network_has_the_schur_complement_error(tmp_path):
    model = BesideANetwork(absorbs=False)
    x = torch.linspace(-3, 3, 64, dtype=D)[:, None]
    monitor = SensitivityMonitor(TARGETS, noise_std=0.1, log_figures=False)
    validate(tmp_path, model, monitor, x)
    labels = monitor.labels
    assert len(labels) == 1 + 2 + 2 + 2 + 1 and labels[1] == "net.0.weight[0, 0]"
    params = [model.C, model.net[0].weight, model.net[2].weight, model.net[0].bias, model.net[2].bias]
    with torch.enable_grad():
        rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(model(x)[i, 0], params)]) for i in range(64)]
    j = torch.stack(rows)  # [64, 8], in the monitor's target order
    f = j.T @ j / 0.01
    assert torch.linalg.matrix_rank(f) == 8
    labels, sigma = monitor.covariance()
    expected = torch.linalg.inv(f)
    assert sigma[0, 0].item() == pytest.approx(expected[0, 0].item(), rel=1e-6)
    schur = f[0, 0] - f[0, 1:] @ torch.linalg.solve(f[1:, 1:], f[1:, 0])
    assert monitor.summary()["C"]["stderr"] == pytest.approx(float(schur.rsqrt()), rel=1e-6)
    assert monitor.summary()["C"]["stderr"] > float(f[0, 0].rsqrt())  # the weights free: a larger error


def test_a_constant_that_a_network_can_absorb_is_reported_not_determined(tmp_path):
    monitor = SensitivityMonitor(TARGETS, noise_std=0.1, log_figures=False)
    validate(tmp_path, BesideANetwork(absorbs=True), monitor, torch.linspace(-3, 3, 64, dtype=D)[:, None])
    summary = monitor.summary()
    assert summary["C"]["stderr"] == math.inf and summary["net.2.bias[0]"]["stderr"] == math.inf
    verdicts = " ".join(monitor.identifiability()["verdicts"])
    assert "C: its standard error is unbounded" in verdicts
    assert "only C¹·net.2.bias[0]" in verdicts and "can change together" in verdicts
    undetermined = [v for v in monitor.identifiability()["verdicts"] if "unbounded" in v or "together" in v]
    assert len(undetermined) == 3 and all("net.0" not in v and "net.2.weight" not in v for v in undetermined)
