"""The model is left as it was: every Parameter and buffer object in its place, bit for bit, after every way the
engine evaluates it, also where one module object is registered under two names."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lightning_sensitivity import per_sample_sensitivities
from tests.helpers import central_differences


def slots(module: nn.Module) -> list[tuple[str, Tensor, Tensor]]:
    """Every slot's name, the tensor object in it and a copy of its value (tied and repeated names included)."""
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    return [(name, tensor, tensor.detach().clone()) for name, tensor in named]


def assert_in_place(module: nn.Module, before: list[tuple[str, Tensor, Tensor]]) -> None:
    now = dict([*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)])
    assert list(now) == [name for name, _, _ in before]
    for name, tensor, value in before:
        assert now[name] is tensor, f"{name} holds another tensor object"
        assert type(now[name]) is type(tensor), name
        assert torch.equal(now[name].detach(), value), f"{name} changed value"


class Twice(nn.Module):
    """One Linear registered as ``a`` and ``b`` (pytorch-forecasting's N-BEATS with shared thetas), and one
    BatchNorm as ``bn`` and ``norm``; ``unused`` reaches nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.a = self.b = nn.Linear(3, 2)
        self.bn = self.norm = nn.BatchNorm1d(2)
        self.unused = nn.Parameter(torch.tensor([0.5]))
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.norm(self.a(x))) + self.b(x).square()


CASES = [["a.weight[0, 1]"], ["a.weight[0, 1]", "b.bias[1]", "norm.running_mean[0]"], ["b.bias[0]", "unused[0]"]]


@pytest.mark.parametrize("method", ["auto", "forward", "reverse"])
@pytest.mark.parametrize("verify", [False, True])
@pytest.mark.parametrize("targets", CASES, ids=["one", "several", "unused"])
def test_a_module_under_two_names_is_left_in_place(targets, verify, method):
    torch.manual_seed(0)
    model = Twice().double().eval()
    x = torch.randn(5, 3, dtype=torch.float64)
    before = slots(model)
    sens = per_sample_sensitivities(model, targets, (x,), method=method, verify=verify)
    assert_in_place(model, before)
    for label, value in sens.items():
        torch.testing.assert_close(value, central_differences(model, label, x), rtol=1e-6, atol=1e-8)
    assert_in_place(model, before)


@pytest.mark.parametrize("chunk_size", [None, 1])
def test_chunks_and_inference_mode_leave_a_module_under_two_names_in_place(chunk_size):
    torch.manual_seed(0)
    model = Twice().eval()
    before = slots(model)
    with torch.inference_mode():
        per_sample_sensitivities(model, CASES[1], (torch.randn(4, 3),), chunk_size=chunk_size, verify=True)
    assert_in_place(model, before)
    model.cpu()  # Lightning's teardown: raised on a leftover functorch-wrapped tensor
    assert_in_place(model, before)


class Scaled(nn.Module):
    """Stores a statistic of its input as a plain attribute (neuralforecast's scaler keeps ``x_shift`` so), and a
    cache made at its first call; ``out = w · (x - mean(x)) + b``."""

    def __init__(self) -> None:
        super().__init__()
        self.scaler = nn.Module()
        self.scaler.shift = torch.zeros(())
        self.net = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        self.scaler.shift = x.mean(1, keepdim=True)
        if not hasattr(self, "cache"):
            self.cache = self.net.weight.sum()
        return self.net(x - self.scaler.shift)


@pytest.mark.parametrize("method", ["auto", "forward", "reverse"])
@pytest.mark.parametrize("targets", [["net.weight[0, 1]"], ["net.weight[0, 1]", "net.bias[1]"]])
@pytest.mark.parametrize("verify", [False, True])
def test_tensors_the_model_stores_as_attributes_are_put_back(method, targets, verify, reference):
    torch.manual_seed(0)
    model, x = Scaled(), torch.randn(5, 3)
    shift = model.scaler.shift
    sens = per_sample_sensitivities(model, targets, (x,), method=method, verify=verify)
    assert model.scaler.shift is shift and not hasattr(model, "cache")  # as before the call, not the engine's
    expected = reference(model, targets, (x,))
    for label in targets:
        torch.testing.assert_close(sens[label], expected[label])
    torch.save(model, __import__("io").BytesIO())  # no functorch wrapper left behind (vmap): it saves
