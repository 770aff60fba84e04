"""The finite-difference check (``verify=True``): silent on ordinary models, whatever the dtype, the scale of
θ or of the outputs; firing where AD is wrong; and leaving the module, the inputs and the random stream as
they were."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from lightning_sensitivity import SensitivityCheckError, per_sample_sensitivities
from tests.helpers import WrongSign, loop_reference, quiet

# ---- the check must not fire on ordinary models ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_check_passes_on_the_zoo(zoo_case, dtype):
    name, model, args, targets, labels = zoo_case
    model = model.to(dtype)
    args = tuple(a.to(dtype) if a.is_floating_point() else a for a in args)
    with torch.inference_mode():
        sens = quiet(model, targets, args, verify=True)
    assert list(sens) == labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["f32", "bf16", "f64"])
def test_check_passes_on_small_relu_nets_at_batch_4(dtype):
    """ReLU kinks inside [θ - h, θ + h] spoil one side of the difference, never both."""
    torch.manual_seed(0)
    for trial in range(60):
        net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).to(dtype)
        targets = [f"0.weight[{trial % 8}, {trial % 3}]", f"2.bias[{trial % 8}]", f"4.weight[1, {trial % 8}]"]
        quiet(net, targets, (torch.randn(4, 3, dtype=dtype),), verify=True)


class Decay(nn.Module):
    """``y = exp(-θ x) x + θ² x``: smooth, with ``dy/dθ = -x² exp(-θ x) + 2 θ x``."""

    def __init__(self, theta: float):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(theta))

    def forward(self, x: Tensor) -> Tensor:
        return torch.exp(-self.theta * x) * x + self.theta**2 * x


@pytest.mark.parametrize("theta", [1e-6, 1e4, -1e4, 0.0, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["f32", "bf16", "f64"])
def test_check_passes_for_every_scale_of_theta(theta, dtype):
    torch.manual_seed(1)
    x = (torch.rand(16, 3) * 1e-4).to(dtype)  # keeps exp(-θ x) finite for |θ| = 1e4
    sens = quiet(Decay(theta).to(dtype), "theta", (x,), verify=True)
    expected = -(x.double() ** 2) * torch.exp(-theta * x.double()) + 2 * theta * x.double()
    torch.testing.assert_close(sens["theta"].double(), expected, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=0)


class Magnitudes(nn.Module):
    """Thirteen outputs from 1e-6 to 1e6 times ``tanh(a x)``."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.7))
        self.register_buffer("scales", torch.logspace(-6, 6, 13))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.a * x) * self.scales


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["f32", "bf16", "f64"])
def test_check_passes_on_outputs_spanning_twelve_orders_of_magnitude(dtype):
    quiet(Magnitudes().to(dtype), "a", (torch.randn(8, 1, dtype=dtype),), verify=True)


def test_check_passes_with_dropout_left_on_and_sees_the_same_masks():
    torch.manual_seed(2)
    for _ in range(10):
        net = nn.Sequential(nn.Linear(3, 16), nn.Dropout(0.5), nn.Tanh(), nn.Linear(16, 2)).train()
        x = torch.randn(4, 3)
        state = torch.get_rng_state()
        with torch.no_grad():
            sens = quiet(net, ["0.weight[1, 1]", "3.weight[0, 3]", "3.bias[1]"], (x,), verify=True)
        # every target saw the masks of one evaluation: the bias's derivative is 1 whatever the mask
        assert torch.equal(sens["3.bias[1]"], torch.tensor([[0.0, 1.0]]).expand(4, 2))
        torch.set_rng_state(state)
        one = quiet(net, ["3.weight[0, 3]"], (x,), verify=True)
        torch.testing.assert_close(one["3.weight[0, 3]"], sens["3.weight[0, 3]"])


def test_check_passes_for_a_target_the_output_does_not_depend_on():
    net = nn.Linear(3, 2)
    net.register_buffer("unused", torch.tensor(1.0))
    for method in ("auto", "forward", "reverse"):
        sens = quiet(net, ["unused", "weight[0, 1]"], (torch.randn(4, 3),), verify=True, method=method)
        assert torch.equal(sens["unused"], torch.zeros(4, 2))
        sens = quiet(net, "unused", (torch.randn(4, 3),), verify=True, method=method)
        assert torch.equal(sens["unused"], torch.zeros(4, 2))


def test_check_never_changes_the_module_or_the_inputs_or_the_random_stream():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.3), nn.Linear(4, 2)).train()
    x = torch.randn(5, 3)
    x_before, state_before = x.clone(), copy.deepcopy(model.state_dict())
    torch.manual_seed(4)
    per_sample_sensitivities(model, ["0.weight[1, 2]", "3.bias[0]"], (x,), verify=True)
    after_check = torch.rand(3)
    torch.manual_seed(4)
    per_sample_sensitivities(model, ["0.weight[1, 2]", "3.bias[0]"], (x,))
    assert torch.equal(torch.rand(3), after_check)  # the check consumed no random numbers of its own
    assert torch.equal(x, x_before)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state_before[key]), key


# ---- the check must fire where AD is wrong ----------------------------------------------------------------


class WithWrongSign(nn.Module):
    def __init__(self):
        super().__init__()
        self.k = nn.Parameter(torch.tensor(0.8))
        self.j = nn.Parameter(torch.tensor(0.3))

    def forward(self, x: Tensor) -> Tensor:
        return WrongSign.apply(self.k * x) + self.j * x


@pytest.mark.parametrize("targets", [["k"], ["k", "j"]], ids=["dual-numbers", "vmap"])
def test_check_fires_on_a_jvp_with_the_wrong_sign(targets):
    with pytest.raises(SensitivityCheckError) as info:
        per_sample_sensitivities(WithWrongSign(), targets, (torch.randn(4, 2),), verify=True)
    message = str(info.value)
    assert "'k'" in message and "|AD| =" in message and "|finite differences| =" in message
    assert "autograd.Function" in message and "verify=False" in message
    assert [m.label for m in info.value.mismatches] == ["k"]
    mismatch = info.value.mismatches[0]
    assert mismatch.ad_norm == pytest.approx(mismatch.fd_norm, rel=0.05)  # same size, opposite sign
    assert isinstance(info.value, RuntimeError)
    per_sample_sensitivities(WithWrongSign(), targets, (torch.randn(4, 2),))  # no check, no error


class MaskedAttentionRow(nn.Module):
    """Softmax of scores ``w * x``, sample 0's row filled with ``finfo.min`` as eager attention masks a left-padded
    position: in float32 that row does not move with ``w`` at all, while the formula's derivative is not zero."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.7))

    def forward(self, x: Tensor) -> Tensor:
        mask = torch.zeros_like(x)
        mask[0] = torch.finfo(x.dtype).min
        return torch.softmax(self.w * x + mask, dim=-1)


def test_a_disagreement_only_where_the_output_is_frozen_says_so():
    model, x = MaskedAttentionRow(), torch.randn(3, 4)
    torch.testing.assert_close(per_sample_sensitivities(model, "w", (x,))["w"], loop_reference(model, ["w"], (x,))["w"])
    with pytest.raises(SensitivityCheckError, match="did not move at all.*finfo\\(dtype\\).min") as raised:
        per_sample_sensitivities(model, "w", (x,), verify=True)
    (mismatch,) = raised.value.mismatches
    assert mismatch.frozen and mismatch.frozen_norm > 0
    with pytest.raises(SensitivityCheckError) as raised:  # a wrong jvp where the output moves: the usual causes
        per_sample_sensitivities(WithWrongSign(), "k", (torch.randn(4, 2),), verify=True)
    assert "Likely causes" in str(raised.value) and not raised.value.mismatches[0].frozen
