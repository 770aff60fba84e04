"""``method='auto'``'s choice between forward mode and per-sample reverse mode, kept in ``Plans``: made from
probe times handed in (no clock), once per input structure, overruled by ``agree``, leaving no trace in the
random stream, and never changed by a forced method."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from lightning_sensitivity import DEFAULT_PLANS, Plans, per_sample_sensitivities
from lightning_sensitivity._modes import forward as forward_mode
from tests.helpers import Wide


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
        x1 = torch.randn(96, 16)
        first = sensitivities_and_output(model, resolved, (x1,), agree=agree, plans=DEFAULT_PLANS).values
        x2 = torch.randn(40, 16)
        second = sensitivities_and_output(model, resolved, (x2,), agree=agree, plans=DEFAULT_PLANS).values
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
