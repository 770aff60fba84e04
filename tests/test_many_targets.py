"""Many targets and a small output: per-sample reverse mode, exact against the loop of ``torch.autograd.grad``,
and ``method="auto"`` choosing it where it is cheaper (and saying so in a debug log line)."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import ZOO, loop_reference
from test_callback import Physics, physics_data, trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_sensitivity import DEFAULT_PLANS, Plans, SensitivityMonitor, per_sample_sensitivities
from lightning_sensitivity._modes import forward as forward_mode

GRAD_MODES = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}
SEPARABLE = ["mlp", "conv-bn-eval", "attention", "transformer", "oscillator", "glob", "seed"]


@pytest.mark.parametrize("mode", sorted(GRAD_MODES))
@pytest.mark.parametrize("name", SEPARABLE)
def test_reverse_method_is_per_sample_and_exact(name, mode):
    make_model, make_args, targets, labels = ZOO[name]
    torch.manual_seed(0)
    model = make_model().double().eval()
    args = tuple(a.double() if a.is_floating_point() else a for a in make_args())
    with GRAD_MODES[mode]():
        sens = per_sample_sensitivities(model, targets, args, method="reverse")
    assert DEFAULT_PLANS[model].per_sample, "per-sample reverse mode was refused"
    expected = loop_reference(model, labels, args)
    for label in labels:
        assert not sens[label].requires_grad
        torch.testing.assert_close(sens[label], expected[label], rtol=1e-9, atol=1e-12)


def test_models_that_mix_samples_fall_back_to_batched_reverse():
    """Batch norm in training mode: each sample's output depends on the others."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh()).double().train()
    x = torch.randn(6, 3, dtype=torch.float64)
    sens = per_sample_sensitivities(model, ["0.weight[1, 2]", "1.bias[0]"], (x,), method="reverse")
    assert DEFAULT_PLANS[model].per_sample is False
    expected = loop_reference(model, ["0.weight[1, 2]", "1.bias[0]"], (x,))
    for label, value in expected.items():
        torch.testing.assert_close(sens[label], value, rtol=1e-9, atol=1e-12)


class Wide(nn.Module):
    def __init__(self, outputs: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, outputs))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def choice_of(caplog) -> str:
    messages = [r.getMessage() for r in caplog.records if r.name == "lightning_sensitivity"]
    assert messages, "no debug line about the choice"
    return "reverse" if "per-sample reverse for" in messages[-1] else "forward"


def test_auto_picks_per_sample_reverse_for_many_targets_and_one_output(caplog):
    """With the probes' times handed in (a clock the test sets, not the machine's), per-sample reverse mode wins
    where its extrapolated cost is lower, and its values are those of forward mode."""
    torch.manual_seed(2)
    model = Wide(1).eval()
    x = torch.randn(128, 16)
    targets = [f"net.2.weight[{i % 256}, {(5 * i + i // 256) % 256}]" for i in range(512)]
    seconds = {"forward": 0.01, "per-sample reverse, one sample": 0.001, "per-sample reverse": 0.02}
    timed: list[str] = []

    def clock(what, fn):
        timed.append(what)
        return fn(), seconds[what]

    with caplog.at_level(logging.DEBUG, logger="lightning_sensitivity"), torch.inference_mode():
        auto = per_sample_sensitivities(model, targets, (x,), plans=Plans(timer=clock))
    assert timed == ["forward", "per-sample reverse, one sample", "per-sample reverse"]
    assert choice_of(caplog) == "reverse"  # 0.02 s x 128 / 64 samples < 0.01 s x 512 / 8 targets
    with torch.inference_mode():
        forward = per_sample_sensitivities(model, targets[:40], (x,), method="forward")
    for label in forward:
        torch.testing.assert_close(auto[label], forward[label], rtol=1e-4, atol=1e-6)


def test_auto_keeps_forward_mode_for_few_targets_and_a_long_output(caplog):
    torch.manual_seed(3)
    model = Wide(64).eval()
    x = torch.randn(64, 16)
    targets = ["net.2.weight[0, 1]", "net.2.weight[3, 4]", "net.0.bias[2]"]
    with caplog.at_level(logging.DEBUG, logger="lightning_sensitivity"):
        per_sample_sensitivities(model, targets, (x,))
    assert choice_of(caplog) == "forward"


def test_few_targets_are_not_timed(monkeypatch):
    """With no more targets than output elements per sample, forward mode is kept from the output's shape: one
    probe, the call itself, nothing timed and no reverse pass."""
    import lightning_sensitivity._choice as choice
    import lightning_sensitivity._engine as engine

    calls = []
    for module in (engine, choice):  # the call, and the choice's probe
        monkeypatch.setattr(module, "forward", lambda *a, **k: calls.append("forward") or forward_mode(*a, **k))
        monkeypatch.setattr(module, "per_sample_reverse", lambda *a, **k: pytest.fail("ran reverse mode"))
    plans = Plans(timer=lambda what, fn: pytest.fail("timed a probe"))
    model = Wide(4).eval()
    x = torch.randn(8, 16)
    sens = per_sample_sensitivities(model, ["net.2.weight[0, 1]", "net.0.bias[2]"], (x,), plans=plans)
    assert calls == ["forward", "forward"] and sens["net.0.bias[2]"].shape == (8, 4)


def test_the_choice_is_measured_once_per_input_structure_and_can_be_overruled(caplog):
    """Batches of another size share the choice (no new probe); ``agree`` (the callback: rank 0's choice on every
    process) decides what is used."""
    from lightning_sensitivity._engine import sensitivities_and_output
    from lightning_sensitivity._targets import resolve_targets

    torch.manual_seed(5)
    model = Wide(1).eval()
    targets = [f"net.2.weight[{i // 16}, {i % 16}]" for i in range(300)]
    resolved = resolve_targets(model, targets, "test")
    asked: list[str] = []

    def agree(choice: str) -> str:  # overrule the measurement, whichever it was
        asked.append(choice)
        return "forward" if choice == "per-sample reverse" else "per-sample reverse"

    with caplog.at_level(logging.DEBUG, logger="lightning_sensitivity"):
        first, _ = sensitivities_and_output(model, resolved, (torch.randn(96, 16),), agree=agree, plans=DEFAULT_PLANS)
        x2 = torch.randn(40, 16)
        second, _ = sensitivities_and_output(model, resolved, (x2,), agree=agree, plans=DEFAULT_PLANS)
    assert len(asked) == 1 and asked[0] in ("forward", "per-sample reverse")  # measured once, for both sizes
    assert len([r for r in caplog.records if r.name == "lightning_sensitivity"]) == 1
    assert first[resolved[0].label].shape == (96, 1) and second[resolved[0].label].shape == (40, 1)
    overruled = "forward" if asked[0] == "per-sample reverse" else "per-sample reverse"
    assert list(DEFAULT_PLANS[model].choices.values()) == [overruled]
    reference = per_sample_sensitivities(model, targets[:5], (x2,), method="forward")
    for label, value in reference.items():  # the overruling mode is exact too
        torch.testing.assert_close(second[label], value, rtol=1e-4, atol=1e-6)


def test_the_probes_leave_no_trace_in_the_random_stream():
    """With dropout on, ``auto``'s probes run the model several times: the result and the random stream after
    the call are those of one evaluation, as with ``method='forward'``."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(16, 64), nn.Dropout(0.5), nn.Tanh(), nn.Linear(64, 1)).train()
    x = torch.randn(32, 16)
    targets = [f"0.weight[{i // 16}, {i % 16}]" for i in range(200)]
    torch.manual_seed(7)
    auto = per_sample_sensitivities(model, targets, (x,))
    after_auto = torch.rand(4)
    DEFAULT_PLANS.clear()
    torch.manual_seed(7)
    forward = per_sample_sensitivities(model, targets, (x,), method="forward")
    assert torch.equal(torch.rand(4), after_auto)
    for label in forward:
        torch.testing.assert_close(auto[label], forward[label])


def test_a_forced_mode_leaves_autos_choice_alone():
    """``method="reverse"`` on the same module and targets must not turn ``auto``'s measured choice into reverse."""
    torch.manual_seed(3)
    model = Wide(64).eval()
    x = torch.randn(64, 16)
    targets = ["net.2.weight[0, 1]", "net.2.weight[3, 4]", "net.0.bias[2]"]
    per_sample_sensitivities(model, targets, (x,))
    (choice,) = DEFAULT_PLANS[model].choices.values()
    assert choice == "forward"
    reverse = per_sample_sensitivities(model, targets, (x,), method="reverse")
    auto = per_sample_sensitivities(model, targets, (x,))
    assert list(DEFAULT_PLANS[model].choices.values()) == ["forward"]
    for label in auto:
        torch.testing.assert_close(auto[label], reverse[label], rtol=1e-4, atol=1e-6)


def test_per_sample_reverse_memory_is_bounded_by_chunk_size():
    torch.manual_seed(4)
    model = Wide(3).double().eval()
    x = torch.randn(20, 16, dtype=torch.float64)
    targets = [f"net.2.weight[{i}, {i + 1}]" for i in range(6)]
    whole = per_sample_sensitivities(model, targets, (x,), method="reverse")
    chunked = per_sample_sensitivities(model, targets, (x,), method="reverse", chunk_size=3)
    for label in whole:
        torch.testing.assert_close(chunked[label], whole[label], rtol=0, atol=1e-14)


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
