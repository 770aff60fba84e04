"""The inputs as the caller gave them: a model that updates its input in place (an inference tensor too) is
evaluated on copies, an input passed twice stays one tensor, and an empty batch gives empty results."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lightning_sensitivity import per_sample_sensitivities
from tests.helpers import loop_reference


class ClampsItsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        x.clamp_(-1.0, 1.0)
        return self.lin(x)


@pytest.mark.parametrize("targets", [["lin.weight[0, 1]"], ["lin.weight[0, 1]", "lin.bias[1]"]])
def test_model_that_updates_its_inference_tensor_input_in_place(targets):
    torch.manual_seed(12)
    model = ClampsItsInput()
    with torch.inference_mode():
        x = torch.randn(5, 3) * 3
        sens = per_sample_sensitivities(model, targets, (x,), verify=True)
    assert torch.equal(sens["lin.weight[0, 1]"][:, 0], x[:, 1].clamp(-1, 1))


class HalvesItsInput(nn.Module):
    """``x /= 2`` inside ``forward``: evaluated again on the same tensor, it would halve it again."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        x /= 2.0
        return torch.tanh(self.lin(x))


@pytest.mark.parametrize("method", ["auto", "forward", "reverse"])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("verify", [False, True])
def test_a_model_that_updates_its_input_in_place_is_evaluated_on_the_input_as_given(method, k, verify):
    labels = ["lin.weight[0, 1]", "lin.weight[1, 2]"][:k]
    model, x = HalvesItsInput(), torch.randn(4, 3)
    given = x.clone()
    expected = {label: loop_reference(model, [label], (x.clone(),))[label] for label in labels}
    for _ in range(2):  # the first call learns that the model updates its input; the second knows
        sens = per_sample_sensitivities(model, labels, (x,), method=method, verify=verify)
        for label in labels:
            torch.testing.assert_close(sens[label], expected[label])
        assert torch.equal(x, given)  # every evaluation ran on a copy: the caller's tensor is as it was


class DoublesOneOfTwo(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 2)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        x.mul_(2.0)
        return self.lin(x + y)  # y is x when the caller passes one tensor twice: then it was doubled too


def test_an_input_passed_twice_stays_one_tensor_in_the_copies():
    model, x = DoublesOneOfTwo(), torch.randn(4, 3)
    given = x.clone()
    copy = x.clone()
    expected = loop_reference(model, ["lin.weight[0, 1]"], (copy, copy))["lin.weight[0, 1]"]
    sens = per_sample_sensitivities(model, "lin.weight[0, 1]", (x, x), verify=True)["lin.weight[0, 1]"]
    torch.testing.assert_close(sens, expected)
    assert torch.equal(x, given)


@pytest.mark.parametrize("method", ["auto", "forward", "reverse"])
@pytest.mark.parametrize("targets", [["0.weight[0, 1]"], ["0.weight[0, 1]", "0.bias[1]"]])
def test_empty_batch(method, targets):
    net = nn.Sequential(nn.Linear(3, 2))
    sens = per_sample_sensitivities(net, targets, (torch.randn(0, 3),), method=method)
    assert all(v.shape == (0, 2) for v in sens.values())
