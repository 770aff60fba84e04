"""Running statistics as targets: BatchNorm's in eval mode against float64 central differences and the
analytic derivative, refused in training mode; InstanceNorm's and a custom ``F.batch_norm``'s buffers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from lightning_sensitivity import per_sample_sensitivities
from tests.helpers import GRAD_MODES, loop_reference, quiet


class Normalised(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.bn(self.lin(x))))


def _normalised() -> Normalised:
    torch.manual_seed(11)
    model = Normalised().double().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 1.5)
    return model


def _bn_reference(model: Normalised, x: Tensor, label: str) -> Tensor:
    """Float64 central differences of the module itself, a step of 1e-6."""
    name, index = label.split("[")
    index = int(index.rstrip("]"))
    out = []
    for sign in (1, -1):
        moved = copy.deepcopy(model)
        with torch.no_grad():
            getattr(moved.bn, name.split(".")[1])[index] += sign * 1e-6
            out.append(moved(x))
    return (out[0] - out[1]) / 2e-6


@pytest.mark.parametrize("mode", sorted(GRAD_MODES))
@pytest.mark.parametrize("method", ["auto", "reverse"])
@pytest.mark.parametrize(
    "targets", [["bn.running_mean[1]"], ["bn.running_var[2]", "bn.running_mean[1]", "lin.bias[0]"]]
)
def test_batchnorm_running_statistics_in_eval_mode(targets, method, mode):
    model = _normalised()
    x = torch.randn(6, 3, dtype=torch.float64)
    before = copy.deepcopy(model.state_dict())
    with GRAD_MODES[mode]():
        sens = quiet(model, targets, (x,), method=method, verify=True)
    for label in targets:
        if label.startswith("bn."):
            expected = _bn_reference(model, x, label)
        else:
            expected = loop_reference(model, [label], (x,))[label]
        assert expected.abs().sum() > 0
        torch.testing.assert_close(sens[label], expected, rtol=1e-6, atol=1e-8)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_batchnorm_running_statistics_match_the_analytic_derivative():
    bn = nn.BatchNorm1d(3).double().eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3]))
        bn.running_var.copy_(torch.tensor([0.5, 2.0, 1.5]))
        bn.weight.copy_(torch.tensor([1.2, 0.7, -0.4]))
    x = torch.randn(5, 3, dtype=torch.float64)
    sens = per_sample_sensitivities(bn, ["running_mean[1]", "running_var[2]"], (x,))
    scale = (bn.running_var + bn.eps).rsqrt()
    expected_mean = torch.zeros(5, 3, dtype=torch.float64)
    expected_mean[:, 1] = -bn.weight[1] * scale[1]
    expected_var = torch.zeros(5, 3, dtype=torch.float64)
    expected_var[:, 2] = -0.5 * (x[:, 2] - bn.running_mean[2]) * bn.weight[2] * scale[2] ** 3
    torch.testing.assert_close(sens["running_mean[1]"], expected_mean.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(sens["running_var[2]"], expected_var.detach(), rtol=1e-12, atol=1e-14)


def test_batchnorm_running_statistics_in_training_mode_are_refused():
    model = _normalised().train()
    with pytest.raises(ValueError, match="'bn.running_mean\\[1\\]'.*training mode.*statistics of its input"):
        per_sample_sensitivities(model, "bn.running_mean[1]", (torch.randn(4, 3, dtype=torch.float64),))


class OwnBatchNorm(nn.Module):
    """Normalises with buffers of its own through ``F.batch_norm``, as some custom layers do."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mu", torch.tensor([0.1, 0.2, 0.3]))
        self.register_buffer("var", torch.tensor([1.0, 2.0, 0.5]))

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.batch_norm(x, self.mu, self.var, training=False)


@pytest.mark.parametrize("method", ["auto", "forward", "reverse"])
def test_running_statistics_of_instance_norm_and_of_a_custom_batch_norm(method):
    torch.manual_seed(0)
    norm = nn.InstanceNorm1d(3, track_running_stats=True)
    norm(torch.randn(4, 3, 7) * 2 + 1)  # running statistics away from 0 and 1
    norm.eval()
    x = torch.randn(4, 3, 7)
    expected = torch.zeros_like(x)
    expected[:, 1] = -1 / torch.sqrt(norm.running_var[1] + norm.eps)  # d (x - m) / sqrt(v + eps) / d m
    sens = per_sample_sensitivities(norm, "running_mean[1]", (x,), method=method, verify=True)
    torch.testing.assert_close(sens["running_mean[1]"], expected)
    own, x = OwnBatchNorm(), torch.randn(4, 3)
    expected = torch.zeros_like(x)
    expected[:, 1] = -1 / torch.sqrt(torch.tensor(2.0 + 1e-5))
    torch.testing.assert_close(per_sample_sensitivities(own, "mu[1]", (x,), method=method)["mu[1]"], expected)
    with pytest.raises(ValueError, match="InstanceNorm1d, which is in training mode"):
        per_sample_sensitivities(norm.train(), "running_mean[1]", (x[:, :, None],), method=method)
