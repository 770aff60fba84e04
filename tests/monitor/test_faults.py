"""Scale and faults: large validation sets with bounded state, frozen targets, NaN parameters, float64 modules,
reverse mode and chunks giving the same histograms, and resuming from a checkpoint with two monitors."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from lightning_sensitivity import SensitivityMonitor
from tests.helpers import Physics, assert_histogram, expected_stats, physics_data, read_events, trainer


def test_large_validation_set_is_exact_with_bounded_state(tmp_path):
    sizes = {}
    for n in (2_000, 20_000):
        model = Physics()
        monitor = SensitivityMonitor(targets=["C", "net.0.weight[0, 1]", "net.2.bias[2]"], reduction="none")
        t = trainer(tmp_path / str(n), monitor)
        val = physics_data(n, seed=9)
        t.validate(model, DataLoader(val, batch_size=1000))
        sizes[n] = sum(
            v.numel() * v.element_size() for v in monitor._stages["validate"].epoch.aggregator.metric_state.values()
        )
        histograms, scalars = read_events(t.logger.log_dir)
        x = val.tensors[0]
        assert_histogram(histograms["sensitivity/C"][0], expected_stats(x[:, :1].expand(-1, 3)), rel=1e-9)
        # d y_j / d bias_2 is 1 for output 2 and 0 for the others, for every sample
        bias = torch.zeros(n, 3)
        bias[:, 2] = 1
        assert_histogram(histograms["sensitivity/net.2.bias[2]"][0], expected_stats(bias), rel=1e-12)
        assert scalars["sensitivity/net.2.bias[2]/mean"][0].value == pytest.approx(1 / 3)
    assert sizes[2_000] == sizes[20_000]


def test_memory_does_not_grow_with_the_validation_set(tmp_path):
    sizes = {}
    for n in (64, 4096):
        monitor = SensitivityMonitor(targets=["C", "net.0.weight[0, 0]"])
        t = trainer(tmp_path / str(n), monitor)
        val = physics_data(n, seed=8)
        t.validate(Physics(), DataLoader(val, batch_size=64))
        state = monitor._stages["validate"].epoch.aggregator.metric_state
        sizes[n] = sum(v.numel() * v.element_size() for v in state.values())
        histograms, _ = read_events(t.logger.log_dir)
        assert histograms["sensitivity/C"][0].histogram_value.num == 3 * n
    assert sizes[64] == sizes[4096]


class Frozen(Physics):
    def __init__(self):
        super().__init__()
        self.C.requires_grad_(False)
        self.net[0].requires_grad_(False)


def test_frozen_parameters_are_valid_targets(tmp_path):
    model = Frozen()
    val = physics_data(30, seed=10)
    t = trainer(tmp_path, SensitivityMonitor(targets=["C", "net.0.weight[1, 1]"]))
    t.fit(model, DataLoader(physics_data(8), batch_size=8), DataLoader(val, batch_size=8))
    histograms, _ = read_events(t.logger.log_dir)
    assert_histogram(histograms["sensitivity/C"][0], expected_stats(val.tensors[0][:, :1].expand(-1, 3)))
    assert histograms["sensitivity/net.0.weight[1, 1]"][0].histogram_value.num == 90
    assert not model.C.requires_grad and not model.net[0].weight.requires_grad


def test_nan_parameter_never_crashes_and_is_counted(tmp_path):
    model = Physics()
    with torch.no_grad():
        model.net[2].weight[0, 0] = float("nan")
    # one target at a time: rows pushed together by vmap share products, and a zero row times NaN is NaN
    t = trainer(tmp_path, SensitivityMonitor(targets=["C", "net.0.bias[0]", "net.2.bias[1]"], chunk_size=1))
    val = physics_data(10, seed=12)
    t.validate(model, DataLoader(val, batch_size=5))
    histograms, scalars = read_events(t.logger.log_dir)
    # Output 0 is NaN for every sample. Its derivative with respect to net.0.bias[0], W[:, 0] * tanh'(z[:, 0]),
    # runs through the NaN weight and is NaN too, and counted; outputs 1 and 2 stay finite. The derivatives with
    # respect to C and net.2.bias[1] do not touch the NaN weight: they are exact (x[:, 0] and 0, as the loop of
    # autograd.grad gives them), with no 0 * NaN from a product by a zero tangent.
    with torch.no_grad():
        z = model.net[0](val.tensors[0])
        expected = model.net[2].weight[:, 0] * (1 - torch.tanh(z[:, :1]) ** 2)
    assert expected[:, 0].isnan().all() and expected[:, 1:].isfinite().all()
    assert_histogram(histograms["sensitivity/net.0.bias[0]"][0], expected_stats(expected))
    assert scalars["sensitivity/net.0.bias[0]/nonfinite"][0].value == 10
    assert_histogram(histograms["sensitivity/C"][0], expected_stats(val.tensors[0][:, :1].expand(-1, 3)))
    bias = torch.tensor([0.0, 1.0, 0.0]).expand(10, 3)
    assert_histogram(histograms["sensitivity/net.2.bias[1]"][0], expected_stats(bias))
    assert scalars["sensitivity/C/nonfinite"][0].value == 0
    assert scalars["sensitivity/net.2.bias[1]/mean"][0].value == pytest.approx(1 / 3)


def test_model_on_a_float64_module(tmp_path):
    model = Physics().double()
    val = physics_data(9, seed=14)
    val.tensors = tuple(t.double() for t in val.tensors)
    t = trainer(tmp_path, SensitivityMonitor(targets=["C"]))
    t.validate(model, DataLoader(val, batch_size=4))
    (event,) = read_events(t.logger.log_dir)[0]["sensitivity/C"]
    assert_histogram(event, expected_stats(val.tensors[0][:, :1].expand(-1, 3)), rel=1e-12)
    assert isinstance(model.C, nn.Parameter) and model.C.dtype == torch.float64


def test_reverse_method_and_chunking_in_the_trainer(tmp_path):
    val = physics_data(20, seed=13)
    results = {}
    for name, kwargs in {"forward": {}, "reverse": {"method": "reverse"}, "chunked": {"chunk_size": 1}}.items():
        model = Physics()
        torch.manual_seed(0)
        model.load_state_dict(Physics().state_dict())
        t = L.Trainer(
            logger=L.pytorch.loggers.TensorBoardLogger(tmp_path / name),
            callbacks=[SensitivityMonitor(targets=["C", "net.0.weight[2, 1]"], **kwargs)],
            enable_progress_bar=False,
        )
        t.validate(model, DataLoader(val, batch_size=6))
        results[name] = read_events(t.logger.log_dir)[0]
    for tag in results["forward"]:
        a = results["forward"][tag][0].histogram_value
        for other in ("reverse", "chunked"):
            b = results[other][tag][0].histogram_value
            assert (a.num, list(a.bucket)) == (b.num, list(b.bucket))
            assert b.sum == pytest.approx(a.sum, rel=1e-5, abs=1e-7)


def test_resume_from_checkpoint_and_two_monitors(tmp_path):
    data = DataLoader(physics_data(16), batch_size=8)
    val = DataLoader(physics_data(12, seed=11), batch_size=4)

    def monitors():
        return [SensitivityMonitor(targets=["C"]), SensitivityMonitor(targets=["net.2.bias[0]"], reduction="sum")]

    first = monitors()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    t = trainer(tmp_path, [*first, ckpt], max_epochs=2, enable_checkpointing=True)
    t.fit(Physics(), data, val)
    assert [m.epochs_logged for m in first] == [2, 2]
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["callbacks"]
    assert {first[0].state_key, first[1].state_key} <= set(state)

    second = monitors()
    t = trainer(tmp_path, second, max_epochs=4)
    t.fit(Physics(), data, val, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert [m.epochs_logged for m in second] == [4, 4]
    before, after = (read_events(tmp_path / "tb" / f"version_{v}")[0] for v in (0, 1))
    for tag in ("sensitivity/C", "sensitivity/net.2.bias[0]"):
        assert [e.step for e in before[tag]] == [2, 4]
        assert [e.step for e in after[tag]] == [6, 8]
    for event in before["sensitivity/net.2.bias[0]"] + after["sensitivity/net.2.bias[0]"]:
        assert event.histogram_value.num == 12 and event.histogram_value.sum == 12  # sum over outputs: 1 each
