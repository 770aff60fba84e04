"""A derivative that AD lost while the output moves with the target is an error, never a zero: a captured or
detached parameter, a reentrant checkpoint, an op without formulas, ``.item()``, a reference of the model's
own; zeros that AD carries (a rounding step, a kink, a dead unit) are taken as they are, and independence is
confirmed once."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lightning_sensitivity import DEFAULT_PLANS, SensitivityCheckError, per_sample_sensitivities
from tests.helpers import loop_reference, quiet


class ScaleBy(torch.autograd.Function):
    """``x * k`` for a ``k`` it is handed detached, as code that captures a parameter does: right for ``x``,
    blind to ``k``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, k):
        return x * k

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_forward(inputs[1])
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def jvp(ctx, x_tangent, _):
        (k,) = ctx.saved_tensors
        return x_tangent * k

    @staticmethod
    def backward(ctx, grad):
        (k,) = ctx.saved_tensors
        return grad * k, None


class Captures(nn.Module):
    def __init__(self):
        super().__init__()
        self.k = nn.Parameter(torch.tensor(2.0))
        self.lin = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return ScaleBy.apply(self.lin(x), self.k.detach())


@pytest.mark.filterwarnings("ignore:.*falling back|.*Falling back:UserWarning")
@pytest.mark.parametrize("verify", [False, True])
def test_check_fires_on_a_function_that_captures_the_parameter(verify):
    """With the Linear's weight as a second target the output has a tangent, so k's zero is materialised: the
    all-zero derivative is confirmed by finite differences, check or no check, in either AD mode."""
    torch.manual_seed(5)
    with pytest.raises(SensitivityCheckError, match="'k'.*either AD mode") as info:
        per_sample_sensitivities(Captures(), ["k", "lin.weight[0, 1]"], (torch.randn(4, 3),), verify=verify)
    assert "lin.weight" not in str(info.value)


class Bessel(nn.Module):
    def __init__(self):
        super().__init__()
        self.k = nn.Parameter(torch.tensor(1.3))

    def forward(self, x: Tensor) -> Tensor:
        return torch.special.bessel_j0(self.k * x)


class Reentrant(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.k = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: Tensor) -> Tensor:
        return checkpoint(lambda z: torch.tanh(self.k * self.lin(z)), x, use_reentrant=True)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("verify", [False, True])
@pytest.mark.parametrize(
    ("model", "targets"),
    [(Bessel, ["k"]), (Reentrant, ["k"]), (Reentrant, ["k", "lin.weight[0, 1]"]), (Captures, ["k"])],
    ids=["bessel", "reentrant-checkpoint", "reentrant-checkpoint-vmap", "captured-parameter"],
)
def test_a_lost_derivative_is_an_error_not_a_zero(model, targets, verify):
    """No tangent reaches the output, but the output moves with the target: never report zero."""
    torch.manual_seed(6)
    with pytest.raises(SensitivityCheckError, match="'k' \\(central differences of norm") as info:
        per_sample_sensitivities(model(), targets, (torch.rand(5, 3) + 0.5,), verify=verify)
    assert "it would have been reported as zero" in str(info.value)


class LostAmongOthers(nn.Module):
    """``y = x * k`` through ``.item()`` (no tangent, no gradient), plus ``c * x``, which AD carries."""

    def __init__(self):
        super().__init__()
        self.k = nn.Parameter(torch.tensor(1.3))
        self.c = nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        return x * self.k.item() + self.c * x


@pytest.mark.parametrize("method", ["forward", "auto", "reverse"])
def test_a_lost_derivative_among_several_targets_is_not_reported_as_zeros(method):
    """With ``c`` reaching the output, ``k``'s lost derivative comes out of a chunk of targets (or of reverse
    mode) as zeros that no mode marks missing: the first call confirms every all-zero derivative."""
    x = torch.linspace(0.5, 2.0, 4)
    with pytest.raises(SensitivityCheckError, match="'k'"):
        per_sample_sensitivities(LostAmongOthers(), ["k", "c"], (x,), method=method)
    with pytest.raises(SensitivityCheckError, match="'k'"):
        per_sample_sensitivities(LostAmongOthers(), "k", (x,), method=method)


def test_a_target_is_remembered_independent_only_if_its_value_never_reaches_the_output():
    """At ``x = 0`` the output is flat along ``k`` (``x * k.item()``): zeros are right there, but ``k`` is not
    independent of the output, so the next batch is checked again. A parameter the output never reads is
    confirmed once."""
    model = LostAmongOthers()
    sens = per_sample_sensitivities(model, ["k", "c"], (torch.zeros(3),))
    assert not sens["k"].any()
    with pytest.raises(SensitivityCheckError, match="'k'"):
        per_sample_sensitivities(model, ["k", "c"], (torch.arange(1.0, 4.0),))

    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.k = nn.Parameter(torch.tensor(2.0))
            self.spare = nn.Parameter(torch.tensor(3.0))

        def forward(self, x):
            return self.k * x

    model, calls = Unused(), []
    from lightning_sensitivity import _verify

    original = _verify.FiniteDifferences.depends
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_verify.FiniteDifferences, "depends", lambda *a: calls.append(1) or original(*a))
        for _ in range(3):
            assert not per_sample_sensitivities(model, "spare", (torch.randn(4),))["spare"].any()
    assert len(calls) == 1


def test_independence_is_confirmed_once_per_module():
    net = nn.Linear(3, 2)
    net.register_buffer("unused", torch.tensor(1.0))
    per_sample_sensitivities(net, "unused", (torch.randn(4, 3),))
    assert DEFAULT_PLANS[net].independent == {"unused"}


class Rounded(nn.Module):
    """``y = round(c x) w``: dy/dc is 0 almost everywhere, and finite differences step across the jumps."""

    def __init__(self):
        super().__init__()
        self.c = nn.Parameter(torch.tensor(3.3))
        self.w = nn.Parameter(torch.tensor(0.7))

    def forward(self, x):
        return torch.round(x * self.c) * self.w


class Policy(nn.Module):
    """The log-probability of an action under ``Categorical(logits=mlp(obs))``, with hidden unit 0 dead on the
    data; the distribution refuses NaN logits."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        with torch.no_grad():
            self.net[0].bias[0] = -100.0

    def forward(self, obs, act):
        return torch.distributions.Categorical(logits=self.net(obs)).log_prob(act).unsqueeze(1)


@pytest.mark.parametrize("method", ["forward", "auto", "reverse"])
def test_zeros_that_ad_carries_are_taken_as_they_are(method):
    """An all-zero derivative that forward mode on the target alone carries as a zero (a rounding step, a ReLU
    kink, a dead unit) is no lost derivative: no finite differences, which would step across the jump or the
    kink, and no NaN probe, which a model may refuse; it is not checked again at later calls."""
    torch.manual_seed(0)
    x = torch.randn(32, 1) * 5
    assert not quiet(Rounded(), ["c", "w"], (x,), method=method)["c"].any()
    kinked = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    nn.init.zeros_(kinked[0].bias)  # with zero inputs every unit sits on its kink, where relu' is 0
    assert not quiet(kinked, ["0.bias[0]", "2.bias[0]"], (torch.zeros(4, 3),), method=method)["0.bias[0]"].any()
    policy, obs, act = Policy(), torch.randn(6, 4), torch.randint(0, 3, (6,))
    labels = ["net.0.weight[0, 0]", "net.0.weight[1, 0]"]
    from lightning_sensitivity import _verify

    calls = []
    original = _verify.FiniteDifferences.evaluate
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_verify.FiniteDifferences, "evaluate", lambda *a: calls.append(1) or original(*a))
        for _ in range(3):
            sens = quiet(policy, labels, (obs, act), method=method)
    assert not sens[labels[0]].any() and calls == []
    torch.testing.assert_close(sens[labels[1]], loop_reference(policy, labels[1:], (obs, act))[labels[1]])


class ThroughAReference(nn.Module):
    """Reads its weight through references of its own, made in ``__init__``: what the engine swaps (the module's
    attribute) never reaches the output, so AD, finite differences and the NaN probe through the attribute all
    see a constant."""

    def __init__(self, holder: str) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        if holder == "partial":
            import functools

            self.project = functools.partial(nn.functional.linear, weight=self.lin.weight)
        else:
            weights = [self.lin.weight]
            self.project = lambda x: x @ weights[0].T

    def forward(self, x: Tensor) -> Tensor:
        return self.project(x)


@pytest.mark.parametrize("holder", ["partial", "list"])
@pytest.mark.parametrize("method", ["auto", "forward", "reverse"])
def test_a_parameter_read_through_a_reference_of_its_own_is_an_error_not_a_zero(holder, method):
    model, x = ThroughAReference(holder), torch.randn(5, 3)
    before = model.lin.weight.detach().clone()
    with pytest.raises(SensitivityCheckError, match="'lin.weight\\[1, 2\\]' through a reference of its own"):
        per_sample_sensitivities(model, "lin.weight[1, 2]", (x,), method=method)
    assert torch.equal(model.lin.weight, before)  # the probe put the value back, bit for bit
