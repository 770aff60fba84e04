"""The engine's cases inside a Trainer, read back from what was logged: per-sample reverse mode, an adjoint ODE
solver, lazy modules, a model that updates its input, empty batches, BatchNorm's running statistics, a
compiled LightningModule, a force model that differentiates inside forward, and a fit that trains bit for
bit as without the monitor."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_sensitivity import SensitivityMonitor
from tests.helpers import (
    AdjointODE,
    Physics,
    Potential,
    assert_histogram,
    central_differences,
    expected_stats,
    loaders,
    loop_reference,
    physics_data,
    read_events,
    trainer,
)


def test_reverse_method_in_the_trainer(tmp_path):
    model = Physics()
    targets = ["C", *(f"net.0.weight[{i}, {j}]" for i in range(8) for j in range(2))]
    t = trainer(tmp_path, SensitivityMonitor(targets=targets, method="reverse"))
    val = physics_data(20, seed=1)
    t.validate(model, DataLoader(val, batch_size=8))
    monitor = next(cb for cb in t.callbacks if isinstance(cb, SensitivityMonitor))
    summary = monitor.summary()
    x = val.tensors[0]
    assert summary["C"]["mean"] == pytest.approx(float(x[:, :1].mean()), rel=1e-5)
    fresh = Physics()
    fresh.load_state_dict(model.state_dict())
    expected = loop_reference(fresh.eval(), ["net.0.weight[3, 1]"], (x,))["net.0.weight[3, 1]"]
    assert summary["net.0.weight[3, 1]"]["mean"] == pytest.approx(float(expected.mean()), rel=1e-4, abs=1e-7)


class AdjointModule(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.ode = AdjointODE()

    def forward(self, y0: Tensor) -> Tensor:
        return self.ode(y0)

    def validation_step(self, batch, batch_idx):
        self.log("val", self(batch[0]).mean())


def test_odeint_adjoint_in_the_trainer_matches_the_loop(tmp_path):
    pytest.importorskip("torchdiffeq")
    torch.manual_seed(0)
    model = AdjointModule()
    y0 = torch.randn(6, 2)
    t = trainer(tmp_path, SensitivityMonitor(targets=["ode.f.k", "ode.f.lin.weight[0, 1]"]))
    with pytest.warns(UserWarning, match="OdeintAdjointMethod.*falling back to batched reverse mode"):
        t.validate(model, DataLoader(TensorDataset(y0), batch_size=3))
    histograms, _ = read_events(t.logger.log_dir)
    for label, value in loop_reference(model.ode, ["f.k", "f.lin.weight[0, 1]"], (y0,)).items():
        assert_histogram(histograms[f"sensitivity/ode.{label}"][0], expected_stats(value), rel=1e-4)


class Lazy(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.LazyLinear(4), nn.Tanh(), nn.Linear(4, 2))

    def forward(self, x):
        return self.net(x)

    def validation_step(self, batch, batch_idx):
        self.log("val", self(batch[0]).mean())


def test_lazy_module_targets_are_resolved_once_materialised(tmp_path):
    torch.manual_seed(1)
    x = torch.randn(10, 3)
    model = Lazy()
    t = trainer(tmp_path, SensitivityMonitor(targets=["net.0.weight[1, -1]", "net.2.bias[0]"]))
    t.validate(model, DataLoader(TensorDataset(x), batch_size=5))
    histograms, _ = read_events(t.logger.log_dir)
    for label, value in loop_reference(model, ["net.0.weight[1, 2]", "net.2.bias[0]"], (x,)).items():
        assert_histogram(histograms[f"sensitivity/{label}"][0], expected_stats(value))


class ClampsInput(Physics):
    def forward(self, x: Tensor) -> Tensor:
        x.clamp_(-1.0, 1.0)
        return self.C * x[:, :1] + self.net(x)


@pytest.mark.parametrize("targets", [["C"], ["C", "net.0.bias[0]"]])
def test_validate_with_a_model_that_updates_its_input_in_place(tmp_path, targets):
    x, y = physics_data(16, seed=1).tensors
    x = x * 3
    t = trainer(tmp_path, SensitivityMonitor(targets=targets))
    t.validate(ClampsInput(), DataLoader(TensorDataset(x.clone(), y), batch_size=8))
    histograms, _ = read_events(t.logger.log_dir)
    assert_histogram(histograms["sensitivity/C"][0], expected_stats(x[:, :1].clamp(-1, 1).expand(-1, 3)))


class Selects(Physics):
    """``sensitivity_step`` keeps the samples whose first feature is positive; a batch may keep none."""

    def sensitivity_step(self, batch, batch_idx):
        x = batch[0]
        return self(x[x[:, 0] > 0])


def test_empty_batch_on_the_reverse_path(tmp_path):
    x, y = physics_data(16, seed=1).tensors
    x[:8, 0] = -x[:8, 0].abs()  # the first batch keeps no sample
    t = trainer(tmp_path, SensitivityMonitor(targets=["C", "net.0.bias[1]"], method="reverse"))
    t.validate(Selects(), DataLoader(TensorDataset(x, y), batch_size=8))
    histograms, _ = read_events(t.logger.log_dir)
    kept = x[x[:, 0] > 0]
    assert_histogram(histograms["sensitivity/C"][0], expected_stats(kept[:, :1].expand(-1, 3)))


class Normalised(Physics):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.C * x[:, :1] + self.net(self.bn(x))


def test_batchnorm_running_statistics_as_targets_in_the_trainer(tmp_path):
    torch.manual_seed(2)
    model = Normalised()
    t = trainer(tmp_path, SensitivityMonitor(targets=["bn.running_mean[1]", "bn.running_var[0]"]))
    t.fit(model, *loaders())
    model.eval()
    x = physics_data(16, seed=1).tensors[0].double()
    model = model.double()
    histograms, _ = read_events(t.logger.log_dir)
    for name, index in (("running_mean", 1), ("running_var", 0)):
        outs = []
        for sign in (1, -1):
            with torch.no_grad():
                getattr(model.bn, name)[index] += sign * 1e-6
                outs.append(model(x))
                getattr(model.bn, name)[index] -= sign * 1e-6
        expected = (outs[0] - outs[1]) / 2e-6
        assert expected.abs().sum() > 0
        assert_histogram(histograms[f"sensitivity/bn.{name}[{index}]"][0], expected_stats(expected), rel=1e-4)


def test_compiled_lightning_module(tmp_path):
    torch.manual_seed(3)
    model = Physics()
    data = physics_data(16, seed=1)
    x = data.tensors[0]
    t = trainer(tmp_path, SensitivityMonitor(targets=["net.2.weight[1, 3]"]), logger=TensorBoardLogger(tmp_path))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", ".*alling back.*")  # compiled code runs eagerly, in forward mode
        t.validate(torch.compile(model), DataLoader(data, batch_size=8))
    histograms, _ = read_events(t.logger.log_dir)
    fresh = Physics()
    fresh.load_state_dict(model.state_dict())
    expected = loop_reference(fresh.eval(), ["net.2.weight[1, 3]"], (x,))["net.2.weight[1, 3]"]
    assert expected.abs().sum() > 0
    assert_histogram(histograms["sensitivity/net.2.weight[1, 3]"][0], expected_stats(expected))


class ForceModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.potential = Potential()

    def forward(self, positions: Tensor) -> Tensor:
        return self.potential(positions)

    def training_step(self, batch, batch_idx):
        positions, forces = batch
        return (self(positions) - forces).square().mean()

    def validation_step(self, batch, batch_idx):
        torch.set_grad_enabled(True)  # schnetpack's AtomisticTask does this for models with derivatives
        positions, forces = batch
        self.log("val_loss", (self(positions) - forces).square().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("fn", ["fit", "validate"])
def test_the_monitor_on_a_force_model(tmp_path, fn):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(12, 4, 3, generator=g), torch.randn(12, 12, generator=g))
    torch.manual_seed(0)
    model = ForceModule()
    targets = ["potential.net.0.weight[0, 1]", "potential.net.2.bias[0]", "potential.unused[0]"]
    monitor = SensitivityMonitor(targets, log_histograms=False, log_figures=False)
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        inference_mode=False,  # a model that differentiates inside forward needs grad in validation
        callbacks=[monitor],
        default_root_dir=tmp_path,
    )
    loader = DataLoader(data, batch_size=6)
    if fn == "fit":
        trainer.fit(model, loader, loader)
    else:
        trainer.validate(model, loader)
    positions = data.tensors[0].double()
    summary = monitor.summary()
    trained = model.double().eval()
    for label in targets:
        expected = central_differences(trained, label, positions)
        assert summary[label]["count"] == expected.numel()
        assert summary[label]["mean"] == pytest.approx(float(expected.mean()), rel=1e-4, abs=1e-7)
        assert summary[label]["abs_mean"] == pytest.approx(float(expected.abs().mean()), rel=1e-4, abs=1e-7)
    assert summary["potential.net.2.bias[0]"]["abs_mean"] == 0.0


class SharedThetas(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.theta_b = self.theta_f = nn.Linear(4, 3)
        self.head = nn.Linear(3, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.theta_b(x)) + self.theta_f(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


def _fit(callbacks: list, tmp_path) -> SharedThetas:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(48, 4, generator=g), torch.randn(48, 1, generator=g))
    torch.manual_seed(0)
    model = SharedThetas()
    trainer = L.Trainer(
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, DataLoader(data, batch_size=16), DataLoader(data, batch_size=16))
    return model


@pytest.mark.parametrize("targets", [["theta_f.weight[0, 1]"], ["theta_b.weight[0, 1]", "theta_f.bias[2]"]])
def test_a_fit_trains_bit_for_bit_as_without_the_monitor(tmp_path, targets):
    plain = _fit([], tmp_path / "plain")
    monitor = SensitivityMonitor(targets, log_histograms=False, log_figures=False)
    watched = _fit([monitor], tmp_path / "watched")
    assert isinstance(watched.theta_f.weight, nn.Parameter) and watched.theta_f is watched.theta_b
    for (name, a), (_, b) in zip(plain.state_dict().items(), watched.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert monitor.summary()[targets[0]]["count"] > 0
