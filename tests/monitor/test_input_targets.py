"""Inputs as targets in the monitor (``batch[0][:, 1]``, ``batch['y0']``): the tangent is placed on that tensor of
the batch, in the default call, the step's own call and ``sensitivity_step`` alike; the statistics (DGSM ν,
profiles) apply unchanged; bad input targets stop the run before the first training step."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import lightning_sensitivity._fused as fused_module
from lightning_sensitivity import SensitivityMonitor
from tests.helpers import Ishigami, ishigami_partials, points, read_events, trainer

D = torch.float64


class IshigamiModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.f = Ishigami()

    def forward(self, x: Tensor) -> Tensor:
        return self.f(x)

    def training_step(self, batch, batch_idx):
        return (self(batch[0]) - batch[1]).square().mean()

    def validation_step(self, batch, batch_idx):
        self.log("val", (self(batch[0]) - batch[1]).square().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize("take_over", [True, False], ids=["taken-over", "after-the-step"])
@pytest.mark.parametrize("fn", ["fit", "validate"])
def test_dgsm_of_the_ishigami_inputs_is_the_analytic_mean_square(tmp_path, monkeypatch, fn, take_over):
    if not take_over:
        monkeypatch.setattr(fused_module, "can_fuse", lambda module: False)
    x = points(96, seed=1)
    data = DataLoader(TensorDataset(x, torch.zeros(96, dtype=D)), batch_size=16)
    monitor = SensitivityMonitor(["batch[0][:, ...]", "f.a"], log_figures=False)
    t = trainer(tmp_path, monitor, max_epochs=1, limit_train_batches=1)
    t.fit(IshigamiModule(), data, data) if fn == "fit" else t.validate(IshigamiModule(), data)
    assert monitor.labels == ["batch[0][:, 0]", "batch[0][:, 1]", "batch[0][:, 2]", "f.a"]
    summary = monitor.summary()
    for j, partial in enumerate(ishigami_partials(x)):
        stats = summary[f"batch[0][:, {j}]"]
        assert stats["count"] == 96
        assert stats["mean_square"] == pytest.approx(float((partial**2).mean()), rel=1e-10)  # ν_j, the DGSM
        assert stats["abs_mean"] == pytest.approx(float(partial.abs().mean()), rel=1e-10)  # μ*_j
    histograms, _ = read_events(t.logger.log_dir)
    assert histograms["sensitivity/batch[0][:, 2]"][-1].histogram_value.num == 96


class Decay(L.LightningModule):
    """``x' = -k x`` by explicit steps from each sample's own ``x0`` (``batch['x0']``): ``dx(t)/dx0 = (1 - k dt)^t``."""

    def __init__(self, step: bool) -> None:
        super().__init__()
        self.k = nn.Parameter(torch.tensor(0.5, dtype=D))
        self.with_step = step

    def forward(self, x0: Tensor) -> Tensor:
        states, x = [], x0
        for _ in range(10):
            x = x - 0.1 * self.k * x
            states.append(x)
        return torch.stack(states, 1)

    def validation_step(self, batch, batch_idx):
        self.log("val", self(batch["x0"]).mean())


class WithStep(Decay):
    def sensitivity_step(self, batch, batch_idx):
        return self(batch["x0"])


class Samples(Dataset):
    def __init__(self, n: int) -> None:
        self.x0 = torch.linspace(-1, 2, n, dtype=D)

    def __len__(self) -> int:
        return len(self.x0)

    def __getitem__(self, i: int) -> dict:
        return {"x0": self.x0[i], "id": i}


def test_the_profile_of_an_initial_condition_is_dx_t_dx0_over_time(tmp_path):
    monitor = SensitivityMonitor(["batch['x0']", "k"], profiles=True, log_figures=False)
    trainer(tmp_path, monitor).validate(WithStep(True), DataLoader(Samples(12), batch_size=4))
    profile = monitor.profiles()["batch['x0']"]["mean"]
    torch.testing.assert_close(profile, (1 - 0.05) ** torch.arange(1, 11, dtype=D), rtol=1e-12, atol=0)


def test_an_input_the_default_call_does_not_take_says_to_define_sensitivity_step(tmp_path):
    class TwoParts(IshigamiModule):
        def validation_step(self, batch, batch_idx):
            self.log("val", self(batch[0]).mean())

    data = DataLoader(TensorDataset(points(8), torch.rand(8, 2, dtype=D)), batch_size=4)
    with pytest.raises(ValueError, match=r"'batch\[1\]\[:, 0\]' names batch\[1\].*does not take.*sensitivity_step"):
        trainer(tmp_path, SensitivityMonitor("batch[1][:, 0]", log_figures=False)).validate(TwoParts(), data)


@pytest.mark.parametrize(
    ("target", "error", "words"),
    [
        ("batch['x1']", ValueError, ["no key 'x1'", "['x0', 'id']"]),
        ("batch['id']", TypeError, ["torch.int64", "floating-point"]),
        ("batch['x0'][:, 1]", IndexError, ["each sample of batch['x0']"]),
        ("batch[0]", ValueError, ["batch has no key 0"]),
    ],
)
@pytest.mark.parametrize("sanity_steps", [2, 0])  # without the sanity check: on the first training batch
def test_bad_input_targets_stop_the_run_before_the_first_training_step(tmp_path, target, error, words, sanity_steps):
    model = WithStep(True)
    model.training_step = lambda batch, batch_idx: pytest.fail("trained")  # type: ignore[method-assign]
    model.configure_optimizers = lambda: torch.optim.SGD(model.parameters(), lr=0.0)  # type: ignore[method-assign]
    loader = DataLoader(Samples(8), batch_size=4)
    with pytest.raises(error) as raised:
        monitor = SensitivityMonitor(target, log_figures=False)
        trainer(tmp_path, monitor, num_sanity_val_steps=sanity_steps).fit(model, loader, loader)
    for word in words:
        assert word in str(raised.value)
    assert math.isfinite(float(model.k))
    assert ("the sanity check is off" in str(raised.value)) == (sanity_steps == 0)
