"""Never a silent wrong number, in real Trainer runs read back from TensorBoard: the finite-difference check
before the first training step, and the Trainer set-ups that used to give zeros, wrong counts or crashes."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from conftest import assert_histogram, expected_stats, loop_reference, read_events
from lightning.pytorch.loggers import TensorBoardLogger
from test_callback import Physics, physics_data, trainer
from test_trust import AdjointODE, WrongSign
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_sensitivity import SensitivityCheckError, SensitivityMonitor


class Steps(Physics):
    """Physics whose ``C`` passes through a Function with a wrong-sign jvp; counts training steps."""

    def forward(self, x: Tensor) -> Tensor:
        return WrongSign.apply(self.C * x[:, :1]) + self.net(x)


def loaders(n_val: int = 16) -> tuple[DataLoader, DataLoader]:
    return DataLoader(physics_data(16), batch_size=8), DataLoader(physics_data(n_val, seed=1), batch_size=8)


# ---- verification -------------------------------------------------------------------------------------------


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


# ---- adjoint ODE solver in the callback ---------------------------------------------------------------------


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


# ---- two monitors --------------------------------------------------------------------------------------------


def test_two_monitors_on_one_target_need_their_own_prefix(tmp_path):
    first = SensitivityMonitor(targets=["C"], reduction="none")
    second = SensitivityMonitor(targets=["C"], every_n_epochs=2)  # differs in every_n_epochs only
    t = trainer(tmp_path, [first, second])  # distinct state keys: the Trainer accepts both
    with pytest.raises(ValueError, match="another SensitivityMonitor.*'C'.*prefix='sensitivity_2'"):
        t.fit(Physics(), *loaders())

    norm = SensitivityMonitor(targets=["C"], reduction="norm", prefix="sensitivity_norm")
    t = trainer(tmp_path / "ok", [SensitivityMonitor(targets=["C"], max_batches=1), norm], max_epochs=2)
    t.fit(Physics(), *loaders())
    histograms, scalars = read_events(t.logger.log_dir)
    x = physics_data(16, seed=1).tensors[0]
    assert_histogram(histograms["sensitivity/C"][0], expected_stats(x[:8, :1].expand(-1, 3)))
    assert_histogram(histograms["sensitivity_norm/C"][0], expected_stats(x[:, :1].abs() * 3**0.5))
    assert len(scalars["sensitivity/C/mean"]) == len(scalars["sensitivity_norm/C/mean"]) == 2
    assert t.callback_metrics["sensitivity_norm/C/mean"] > 0


def test_bad_prefix_is_refused():
    for prefix in ("", "/sens", "sens/", " s"):
        with pytest.raises(ValueError, match="prefix"):
            SensitivityMonitor(targets="C", prefix=prefix)


# ---- the standalone pytorch_lightning package ----------------------------------------------------------------


def test_standalone_pytorch_lightning_trainer_and_logger(tmp_path):
    pl = pytest.importorskip("pytorch_lightning")

    class Standalone(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.C = nn.Parameter(torch.tensor(-5.0))

        def forward(self, x):
            return self.C * x

        def training_step(self, batch, batch_idx):
            return (self(batch[0]) ** 2).mean()

        def validation_step(self, batch, batch_idx):
            self.log("val", self(batch[0]).mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    x = torch.randn(12, 2)
    t = pl.Trainer(
        max_epochs=1,
        logger=pl.loggers.TensorBoardLogger(tmp_path, name="pl"),
        callbacks=[SensitivityMonitor(targets="C")],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("error", ".*TensorBoardLogger.*")
        t.fit(Standalone(), DataLoader(TensorDataset(x), batch_size=4), DataLoader(TensorDataset(x), batch_size=4))
    histograms, scalars = read_events(t.logger.log_dir)
    assert_histogram(histograms["sensitivity/C"][0], expected_stats(x))
    assert scalars["sensitivity/C/mean"][0].value == pytest.approx(float(x.mean()), rel=1e-5)


# ---- crashes and unhelpful errors ------------------------------------------------------------------------


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


class TwoInputs(Physics):
    """A ``forward`` that needs two inputs, which the steps never call (so no call of the step can stand in for
    the default call)."""

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.C * x[:, :1] * t + self.net(x)

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).square().mean()

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.log("val", self.net(batch[0]).mean())


def test_forward_that_needs_more_than_the_first_element_says_to_define_sensitivity_step(tmp_path):
    t = trainer(tmp_path, SensitivityMonitor(targets="C"))
    with pytest.raises(TypeError, match="TwoInputs.forward\\(x.*, t.*\\).*first element.*sensitivity_step"):
        t.fit(TwoInputs(), *loaders())


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
