"""Never a silent wrong number, in real Trainer runs: the finite-difference check on the first batch it
differentiates (also inside the step's own call), no false alarm in other precisions, and a derivative AD
lost raised or, with ``verify='warn'``, logged as NaN."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_sensitivity import SensitivityCheckError, SensitivityMonitor
from tests.helpers import Counted, Physics, WrongSign, loaders, physics_data, read_events, trainer


class Steps(Physics):
    """Physics whose ``C`` passes through a Function with a wrong-sign jvp; counts training steps."""

    def forward(self, x: Tensor) -> Tensor:
        return WrongSign.apply(self.C * x[:, :1]) + self.net(x)


@pytest.mark.parametrize("sanity", [2, 0], ids=["sanity-check", "no-sanity-check"])
def test_check_stops_the_run_on_the_first_batch_it_differentiates(tmp_path, sanity):
    model = Steps()
    t = trainer(tmp_path, SensitivityMonitor(targets=["C", "net.0.bias[1]"]), num_sanity_val_steps=sanity)
    with pytest.raises(SensitivityCheckError, match="first validation batch.*'C': \\|AD\\| =") as info:
        t.fit(model, *loaders())
    assert [m.label for m in info.value.mismatches] == ["C"]
    assert model.training_steps == (0 if sanity else 2)  # before the first step, or at the first validation


def test_check_warns_once_and_goes_on(tmp_path):
    t = trainer(tmp_path, SensitivityMonitor(targets=["C"], verify="warn"), max_epochs=2)
    with pytest.warns(UserWarning, match="disagree on the first validation batch") as record:
        t.fit(Steps(), *loaders())
    assert len([w for w in record if "disagree" in str(w.message)]) == 1
    histograms, _ = read_events(t.logger.log_dir)
    assert len(histograms["sensitivity/C"]) == 2


def test_check_off_logs_what_ad_says(tmp_path):
    t = trainer(tmp_path, SensitivityMonitor(targets=["C"], verify=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
        t.fit(Steps(), *loaders())
    assert "sensitivity/C" in read_events(t.logger.log_dir)[0]


class WrongDerivative(Counted):
    """``C`` passes through a Function whose jvp has the wrong sign: the first batch's check must still stop the
    run when that batch is differentiated inside the step."""

    def forward(self, x: Tensor) -> Tensor:
        self.forwards += 1
        return WrongSign.apply(self.C * x[:, :1]) + self.net(x)


@pytest.mark.parametrize("verify", ["error", "warn"])
def test_the_check_inside_the_steps_call_still_stops_or_warns(tmp_path, verify):
    model = WrongDerivative()
    monitor = SensitivityMonitor(["C"], verify=verify, log_figures=False)
    trainer = L.Trainer(logger=False, callbacks=[monitor], enable_progress_bar=False)
    data = DataLoader(physics_data(40), batch_size=8)
    if verify == "error":
        with pytest.raises(SensitivityCheckError, match="first validation batch"):
            trainer.validate(model, data, verbose=False)
    else:
        with pytest.warns(UserWarning, match="disagree on the first validation batch") as record:
            trainer.validate(model, data, verbose=False)
        assert len([w for w in record if "disagree" in str(w.message)]) == 1
        assert monitor.summary()["C"]["count"] == 120
    assert "forward" not in model.__dict__


class Dropped(Physics):
    """Dropout left on during validation (Monte Carlo dropout)."""

    def forward(self, x: Tensor) -> Tensor:
        return self.C * x[:, :1] + F.dropout(self.net(x), 0.3, training=True)


@pytest.mark.parametrize(
    ("precision", "model"),
    [("bf16-true", Physics), ("64-true", Physics), ("32-true", Dropped), ("bf16-mixed", Physics)],
    ids=["bf16-true", "64-true", "dropout-on", "bf16-mixed"],
)
def test_check_raises_no_false_alarm(tmp_path, precision, model):
    monitor = SensitivityMonitor(targets=["C", "net.0.weight[3, 1]", "net.2.bias[0]"])
    t = trainer(tmp_path, monitor, precision=precision)
    t.fit(model(), *loaders())
    histograms, _ = read_events(t.logger.log_dir)
    assert histograms["sensitivity/C"][0].histogram_value.num == 48


# ---- a derivative that AD lost -------------------------------------------------------------------------------


class ThroughItem(L.LightningModule):
    """``y = x * k.item() + c * x``: ``k`` reaches the output through a Python number, which carries no tangent."""

    def __init__(self) -> None:
        super().__init__()
        self.k = nn.Parameter(torch.tensor(1.3))
        self.c = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.k.item() + self.c * x

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def run(tmp_path, monitor: SensitivityMonitor, fn: str = "fit") -> L.Trainer:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(24, 3, generator=g) + 0.5, torch.randn(24, 3, generator=g))
    trainer = L.Trainer(
        max_epochs=2,
        limit_train_batches=2,
        logger=TensorBoardLogger(tmp_path, name="tb"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor],
    )
    loader = DataLoader(data, batch_size=8)
    if fn == "fit":
        trainer.fit(ThroughItem(), loader, loader)
    else:
        trainer.validate(ThroughItem(), loader)
    return trainer


@pytest.mark.parametrize("fn", ["fit", "validate"])
def test_warn_logs_a_lost_derivative_as_nan_and_warns_once(tmp_path, fn):
    monitor = SensitivityMonitor(["k", "c"], verify="warn", log_figures=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = run(tmp_path, monitor, fn)
    lost = [w for w in caught if "'k'" in str(w.message) and "NaN" in str(w.message)]
    assert len(lost) == 1, [str(w.message) for w in caught]
    assert "'c'" not in str(lost[0].message)
    summary = monitor.summary()
    assert summary["k"]["count"] == 0 and summary["k"]["nonfinite"] == 24 * 3
    x = trainer.val_dataloaders.dataset.tensors[0]  # dy/dc = x
    assert summary["c"]["nonfinite"] == 0 and summary["c"]["count"] == 24 * 3
    assert summary["c"]["mean"] == pytest.approx(float(x.double().mean()), rel=1e-6)
    _, scalars = read_events(trainer.logger.log_dir)
    assert [e.value for e in scalars["sensitivity/k/nonfinite"]] == [72.0] * len(scalars["sensitivity/k/nonfinite"])


@pytest.mark.parametrize("verify", [True, False])
def test_error_and_off_raise_on_a_lost_derivative(tmp_path, verify):
    with pytest.raises(SensitivityCheckError, match="'k'"):
        run(tmp_path, SensitivityMonitor(["k", "c"], verify=verify, log_figures=False))
