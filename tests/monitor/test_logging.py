"""SensitivityMonitor in a real Trainer: histograms and scalars read back from TensorBoard event files, for
tuple and dict batches, every reduction, non-finite values, several dataloaders, the epochs it logs, and the
reverse-mode fallback."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_sensitivity import SensitivityMonitor
from tests.helpers import (
    DictData,
    Physics,
    assert_histogram,
    expected_stats,
    loop_reference,
    physics_data,
    read_events,
    trainer,
)


def reduce(values: Tensor, reduction: str) -> Tensor:
    per_sample = values.reshape(values.shape[0], -1).double()
    return {
        "none": per_sample.reshape(-1),
        "sum": per_sample.sum(1),
        "mean": per_sample.mean(1),
        "norm": per_sample.norm(dim=1),
    }[reduction]


def copy_of(model: L.LightningModule) -> L.LightningModule:
    fresh = type(model)()
    fresh.load_state_dict(model.state_dict())
    return fresh.eval()


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "norm"])
def test_tuple_batches_match_analytic_and_loop_reference(tmp_path, reduction):
    torch.manual_seed(0)
    model = Physics()
    val = physics_data(37, seed=1)  # 37 = 4 batches of 8 and an uneven last batch of 5
    label = "net.2.weight[1, 3]"
    monitor = SensitivityMonitor(targets=["C", "net.2.weight[1, -5]"], reduction=reduction)
    t = trainer(tmp_path, monitor)  # Trainer defaults otherwise: inference_mode=True
    t.fit(model, DataLoader(physics_data(16), batch_size=8), DataLoader(val, batch_size=8))

    histograms, scalars = read_events(t.logger.log_dir)
    x = val.tensors[0]
    analytic = x[:, :1].expand(-1, 3)  # dy/dC
    weight_ref = loop_reference(copy_of(model), [label], (x,))[label]
    for target, ref in (("C", analytic), (label, weight_ref)):
        stats = expected_stats(reduce(ref, reduction))
        (event,) = histograms[f"sensitivity/{target}"]
        assert event.step == t.global_step == 2
        assert_histogram(event, stats)
        for stat in ("mean", "std", "abs_mean", "nonfinite"):
            (scalar,) = scalars[f"sensitivity/{target}/{stat}"]
            assert scalar.value == pytest.approx(stats[stat], rel=1e-5, abs=1e-7), stat
            assert t.callback_metrics[f"sensitivity/{target}/{stat}"].item() == pytest.approx(scalar.value)
    assert monitor.labels == ["C", label]


class Classifier(L.LightningModule):
    """Softmax classifier with a temperature; sensitivity of the true-class probability."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 3)
        self.T = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return self.net(x) / self.T

    def true_class_probability(self, x, y):
        return self(x).softmax(-1).gather(1, y[:, None]).squeeze(1)

    def sensitivity_step(self, batch, batch_idx):
        return self.true_class_probability(batch["x"], batch["y"])

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["x"]), batch["y"])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch["x"]), batch["y"]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_dict_batches_with_sensitivity_step(tmp_path):
    torch.manual_seed(0)
    model = Classifier()
    val = DictData(30, seed=2)
    monitor = SensitivityMonitor(targets=["T", "net.weight[2, 0]"])
    t = trainer(tmp_path, monitor, max_epochs=2)
    t.fit(model, DataLoader(DictData(16), batch_size=8), DataLoader(val, batch_size=7))

    reference = copy_of(model)
    histograms, _ = read_events(t.logger.log_dir)
    for target, tensor in (("T", reference.T), ("net.weight[2, 0]", reference.net.weight)):
        grads = []
        for i in range(len(val)):  # the seed's loop: one backward pass per sample
            p = reference.true_class_probability(val.x[i : i + 1], val.y[i : i + 1])
            (g,) = torch.autograd.grad(p.sum(), tensor)
            grads.append(g if tensor.dim() == 0 else g[2, 0])
        events = histograms[f"sensitivity/{target}"]
        assert [e.step for e in events] == [2, 4]
        assert_histogram(events[-1], expected_stats(torch.stack(grads)))


def test_dict_batch_without_sensitivity_step_is_a_clear_error(tmp_path):
    class NoStep(Classifier):
        sensitivity_step = None

    t = trainer(tmp_path, SensitivityMonitor(targets=["T"]))
    data = DataLoader(DictData(8), batch_size=4)
    with pytest.raises(TypeError, match="define `sensitivity_step"):
        t.fit(NoStep(), data, data)


class SquareRoot(L.LightningModule):
    """``y = C * sqrt(x)``: NaN for negative inputs, Inf for infinite ones; ``dy/dC = sqrt(x)``."""

    def __init__(self):
        super().__init__()
        self.C = nn.Parameter(torch.tensor(2.0))
        self.unused = nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        return self.C * x.sqrt()

    def training_step(self, batch, batch_idx):
        return F.mse_loss(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_nonfinite_samples_are_left_out_and_counted(tmp_path):
    x = torch.rand(40, 2) + 0.1
    x[3, 0], x[17, 1], x[18, 0] = -1.0, -4.0, float("inf")
    train = TensorDataset(torch.rand(8, 2), torch.rand(8, 2))
    monitor = SensitivityMonitor(targets=["C"])
    t = trainer(tmp_path, monitor)
    t.fit(SquareRoot(), DataLoader(train, batch_size=8), DataLoader(TensorDataset(x, x), batch_size=16))
    stats = expected_stats(x.sqrt())
    assert stats["nonfinite"] == 3 and stats["num"] == 77
    histograms, scalars = read_events(t.logger.log_dir)
    assert_histogram(histograms["sensitivity/C"][0], stats)
    assert scalars["sensitivity/C/nonfinite"][0].value == 3
    assert scalars["sensitivity/C/mean"][0].value == pytest.approx(stats["mean"], rel=1e-6)


def test_target_the_output_does_not_depend_on_warns_once(tmp_path):
    train = TensorDataset(torch.rand(8, 2), torch.rand(8, 2))
    monitor = SensitivityMonitor(targets=["unused", "C"])
    t = trainer(tmp_path, monitor, max_epochs=2)
    with pytest.warns(UserWarning, match="every sensitivity to 'unused' is zero") as record:
        t.fit(SquareRoot(), DataLoader(train, batch_size=8), DataLoader(train, batch_size=8))
    assert len([w for w in record if "is zero" in str(w.message)]) == 1
    histograms, _ = read_events(t.logger.log_dir)
    assert [e.histogram_value.num for e in histograms["sensitivity/unused"]] == [16, 16]


def test_every_n_epochs_and_sanity_check(tmp_path):
    data = DataLoader(physics_data(16), batch_size=8)
    monitor = SensitivityMonitor(targets=["C"], every_n_epochs=2)
    t = trainer(tmp_path / "a", monitor, max_epochs=5)
    t.fit(Physics(), data, data)
    histograms, scalars = read_events(t.logger.log_dir)
    assert [e.step for e in histograms["sensitivity/C"]] == [4, 8]
    assert [e.step for e in scalars["sensitivity/C/mean"]] == [3, 7]  # Lightning logs epoch metrics at step-1

    monitor = SensitivityMonitor(targets=["C"], log_sanity_check=True)
    t = trainer(tmp_path / "b", monitor, max_epochs=1)
    t.fit(Physics(), data, data)
    histograms, _ = read_events(t.logger.log_dir)
    assert [e.step for e in histograms["sensitivity/C"]] == [0, 2]
    sanity, epoch = histograms["sensitivity/C"]
    assert sanity.histogram_value.num == 16 * 3  # the sanity check ran 2 batches of 8 samples, 3 outputs each
    assert epoch.histogram_value.num == 16 * 3


def test_validate_alone_with_trainer_defaults(tmp_path):
    model = Physics()
    val = physics_data(21, seed=4)
    t = L.Trainer(
        logger=TensorBoardLogger(tmp_path),
        callbacks=[SensitivityMonitor(["C"], every_n_epochs=3)],
        enable_progress_bar=False,
    )
    t.validate(model, DataLoader(val, batch_size=5))
    t.validate(model, DataLoader(val, batch_size=5))
    histograms, _ = read_events(t.logger.log_dir)
    events = histograms["sensitivity/C"]
    assert [e.step for e in events] == [0, 0]
    for event in events:
        assert_histogram(event, expected_stats(val.tensors[0][:, :1].expand(-1, 3)))


def test_several_dataloaders_max_batches_and_limit_val_batches(tmp_path):
    a, b = physics_data(24, seed=5), physics_data(18, seed=6)
    loaders = [DataLoader(a, batch_size=4), DataLoader(b, batch_size=4)]
    train = DataLoader(physics_data(8), batch_size=8)
    cases = {
        "all": (SensitivityMonitor(["C"], reduction="mean"), {}, torch.cat([a.tensors[0], b.tensors[0]])),
        "second": (SensitivityMonitor(["C"], reduction="mean", dataloaders=[1]), {}, b.tensors[0]),
        "max_batches": (
            SensitivityMonitor(["C"], reduction="mean", max_batches=2),
            {},
            torch.cat([a.tensors[0][:8], b.tensors[0][:8]]),
        ),
        "limit_val_batches": (
            SensitivityMonitor(["C"], reduction="mean"),
            {"limit_val_batches": 3},
            torch.cat([a.tensors[0][:12], b.tensors[0][:12]]),
        ),
    }
    for name, (monitor, kwargs, x) in cases.items():
        t = trainer(tmp_path / name, monitor, **kwargs)
        t.fit(Physics(), train, loaders)
        histograms, _ = read_events(t.logger.log_dir)
        (event,) = histograms["sensitivity/C"]
        assert_histogram(event, expected_stats(x[:, 0]))


class PerLoader(Physics):
    def sensitivity_step(self, batch, batch_idx, dataloader_idx):
        return self(batch[0])[:, 0] * (dataloader_idx + 1)


class PerLoaderOtherName(Physics):
    def sensitivity_step(self, batch, batch_idx, loader=0):
        return self(batch[0])[:, 0] * (loader + 1)


class PerLoaderArgs(Physics):
    def sensitivity_step(self, batch, batch_idx, *args):
        return self(batch[0])[:, 0] * (args[0] + 1)


@pytest.mark.parametrize("module", [PerLoader, PerLoaderOtherName, PerLoaderArgs])
def test_sensitivity_step_receives_dataloader_idx(tmp_path, module):
    """As Lightning gives it to ``validation_step``: to a third parameter of any name, or to ``*args``."""
    a, b = physics_data(10, seed=15), physics_data(6, seed=16)
    t = trainer(tmp_path, SensitivityMonitor(targets=["C"]))
    t.fit(module(), DataLoader(physics_data(8), batch_size=8), [DataLoader(a, batch_size=4), DataLoader(b)])
    expected = torch.cat([a.tensors[0][:, 0], 2 * b.tensors[0][:, 0]])  # d (y * (idx + 1)) / dC
    (event,) = read_events(t.logger.log_dir)[0]["sensitivity/C"]
    assert_histogram(event, expected_stats(expected))


def test_reverse_fallback_inside_the_trainer(tmp_path):
    class Distances(Physics):
        def forward(self, x):
            return torch.cdist(x, self.net[0].weight[:, :2]) * self.C

    val = physics_data(12, outputs=8, seed=7)
    monitor = SensitivityMonitor(targets=["C", "net.0.weight[1, 0]"])
    t = trainer(tmp_path, monitor)
    model = Distances(outputs=8)
    with pytest.warns(UserWarning, match="falling back to batched reverse mode"):
        t.fit(model, DataLoader(physics_data(8, outputs=8), batch_size=8), DataLoader(val, batch_size=6))
    fresh = Distances(outputs=8)
    fresh.load_state_dict(model.state_dict())
    ref = loop_reference(fresh, ["C", "net.0.weight[1, 0]"], (val.tensors[0],))
    histograms, _ = read_events(t.logger.log_dir)
    for label, value in ref.items():
        assert_histogram(histograms[f"sensitivity/{label}"][0], expected_stats(value))
