"""The monitor's arguments and errors: bad arguments name the argument, bad targets and outputs that cannot be
differentiated stop the run before the first training step, prefixes that would collide are refused."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_sensitivity import SensitivityMonitor
from tests.helpers import (
    DictData,
    Physics,
    assert_histogram,
    expected_stats,
    loaders,
    physics_data,
    read_events,
    trainer,
)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"every_n_epochs": 0}, "every_n_epochs"),
        ({"every_n_epochs": 1.5}, "every_n_epochs"),
        ({"max_batches": 0}, "max_batches"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"reduction": "max"}, "reduction"),
        ({"method": "jacrev"}, "method"),
        ({"dataloaders": [-1]}, "dataloaders"),
        ({"buckets_per_octave": 0}, "buckets_per_octave"),
        ({"targets": []}, "targets"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    kwargs = {"targets": ["C"], **kwargs}
    with pytest.raises(ValueError, match=rf"SensitivityMonitor\({name}=\.\.\.\)"):
        SensitivityMonitor(**kwargs)


def test_bad_analysis_arguments():
    with pytest.raises(ValueError, match="normalize"):
        SensitivityMonitor(targets="A", normalize="log")
    with pytest.raises(ValueError, match="max_profile_elements"):
        SensitivityMonitor(targets="A", max_profile_elements=0)
    with pytest.raises(ValueError, match="stages"):
        SensitivityMonitor(targets="A", stages=["train"])


def test_bad_prefix_is_refused():
    for prefix in ("", "/sens", "sens/", " s"):
        with pytest.raises(ValueError, match="prefix"):
            SensitivityMonitor(targets="C", prefix=prefix)


def test_state_key_tells_two_monitors_apart():
    assert SensitivityMonitor(["C"]).state_key != SensitivityMonitor(["C", "net.0.bias[0]"]).state_key


def test_methods_before_any_epoch_and_without_profiles():
    monitor = SensitivityMonitor(targets="A")
    for call in (monitor.summary, monitor.correlation):
        with pytest.raises(RuntimeError, match="no epoch has been logged yet"):
            call()
    with pytest.raises(RuntimeError, match="profiles=True"):
        monitor.profiles()


class Counting(Physics):
    pass


def test_unknown_target_stops_the_run_before_the_first_training_step(tmp_path):
    model = Counting()
    t = trainer(tmp_path, SensitivityMonitor(targets=["C", "net.2.wieght[1, 3]"]))
    data = DataLoader(physics_data(8), batch_size=8)
    with pytest.raises(ValueError, match=r"'net\.2\.wieght\[1, 3\]'.*did you mean 'net\.2\.weight\[1, 3\]'"):
        t.fit(model, data, data)
    assert model.training_steps == 0
    assert not list((tmp_path).rglob("events.out.tfevents.*")) or not read_events(t.logger.log_dir)[0]


class WithTable(Physics):
    def __init__(self):
        super().__init__()
        self.register_buffer("steps", torch.tensor([1, 2, 3]))


@pytest.mark.parametrize(
    ("targets", "error", "fragment"),
    [
        (["C", "net.0.wieght[0, 0]"], ValueError, "did you mean 'net.0.weight[0, 0]'"),
        (["steps[0]"], TypeError, "torch.int64"),
        (["net.0.weight"], ValueError, "holds 16 elements"),
        (["net.0.weight[8, 0]"], IndexError, "out of range"),
        (["blocks.*.alpha"], ValueError, "matches no parameter or buffer"),
        (["C", "C"], ValueError, "both name"),
    ],
)
def test_bad_targets_stop_the_run_before_any_training_step(tmp_path, targets, error, fragment):
    model = WithTable()
    t = trainer(tmp_path, SensitivityMonitor(targets=targets))
    data = DataLoader(physics_data(8), batch_size=8)
    with pytest.raises(error, match="SensitivityMonitor") as info:
        t.fit(model, data, data)
    assert fragment in str(info.value)
    assert model.training_steps == 0


class TupleOutput(Physics):
    def forward(self, x):
        return super().forward(x), x

    def validation_step(self, batch, batch_idx):
        pass


class ScalarOutput(TupleOutput):
    def forward(self, x):
        return Physics.forward(self, x).sum()


class NoStepDict(Physics):
    def training_step(self, batch, batch_idx):
        self.training_steps += 1
        return super().forward(batch["x"][:, :2]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        pass


@pytest.mark.parametrize(
    ("model_cls", "data", "error", "fragment"),
    [
        (TupleOutput, physics_data(8), TypeError, "returned tuple"),
        (ScalarOutput, physics_data(8), ValueError, "0-dim"),
        (NoStepDict, DictData(8), TypeError, "sensitivity_step"),
    ],
)
def test_outputs_that_cannot_be_differentiated_stop_the_run_in_the_sanity_check(
    tmp_path, model_cls, data, error, fragment
):
    model = model_cls()
    t = trainer(tmp_path, SensitivityMonitor(targets=["C"]))
    loader = DataLoader(data, batch_size=4)
    with pytest.raises(error, match=fragment):
        t.fit(model, loader, loader)
    assert model.training_steps == 0


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


class ForwardTakesTheBatch(L.LightningModule):
    """``forward`` picks the input from the whole batch itself, so the monitor's default call
    ``pl_module(batch[0])`` runs it on the first sample: 3 rows (its output elements) for a batch of 4."""

    def __init__(self) -> None:
        super().__init__()
        self.C = nn.Parameter(torch.tensor(-5.0))
        self.net = nn.Linear(2, 3)

    def forward(self, batch):
        return self.C * self.net(batch[0])

    def training_step(self, batch, batch_idx):
        return self(batch).square().mean()

    def validation_step(self, batch, batch_idx):
        self.log("val_out", self(batch).sum())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_an_output_whose_rows_are_not_the_inputs_samples_is_warned_about_once(tmp_path):
    model = ForwardTakesTheBatch()
    monitor = SensitivityMonitor(targets=["C"], log_figures=False)
    t = trainer(tmp_path, monitor, limit_train_batches=1, max_epochs=2, num_sanity_val_steps=0)
    loader = DataLoader(physics_data(8), batch_size=4)
    with pytest.warns(UserWarning, match=r"returned 3 rows for an input of 4 samples") as record:
        t.fit(model, loader, loader)
    assert len([w for w in record if "rows for an input" in str(w.message)]) == 1
    assert monitor.summary()["C"]["count"] == 6  # what was asked for: warned, not changed


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


class Layered(L.LightningModule):
    """Layers named as scvi-tools names them: ``Layer 0`` holds a space."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.ModuleDict({"Layer 0": nn.Linear(2, 4), "Layer 1": nn.Linear(4, 3)})

    def forward(self, x: Tensor) -> Tensor:
        return self.enc["Layer 1"](torch.tanh(self.enc["Layer 0"](x)))

    def validation_step(self, batch, batch_idx):
        self.log("val", self(batch[0]).mean())


def test_targets_named_with_spaces_are_logged_under_their_labels(tmp_path):
    from tests.helpers import loop_reference

    monitor = SensitivityMonitor(["enc.Layer 0.weight[1, -1]", "enc.*.bias[0]"], log_figures=False)
    t = trainer(tmp_path, monitor)
    val = physics_data(12, seed=3)
    model = Layered()
    t.validate(model, DataLoader(val, batch_size=4))
    labels = ["enc.Layer 0.weight[1, 1]", "enc.Layer 0.bias[0]", "enc.Layer 1.bias[0]"]
    assert monitor.labels == labels
    histograms, _ = read_events(t.logger.log_dir)
    for label, value in loop_reference(model.eval(), labels, (val.tensors[0],)).items():
        assert_histogram(histograms[f"sensitivity/{label}"][0], expected_stats(value))
    again = SensitivityMonitor(monitor.labels, log_figures=False)  # every label is a target again
    trainer(tmp_path / "again", again).validate(model, DataLoader(val, batch_size=4))
    assert again.labels == labels


def test_a_comma_separated_string_of_targets_is_refused_with_the_list():
    with pytest.raises(ValueError, match=r"targets takes a list .*\['K', 'r'\]"):
        SensitivityMonitor(targets="K, r")
