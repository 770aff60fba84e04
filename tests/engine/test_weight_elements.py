"""One element of a weight that a product uses: its one-hot tangent reads only its own input, no dense one-hot
product; where that shortcut must step aside (a backward pass or a vmap inside the model, a weight updated in
place); and real layers in every dtype and memory format, against the loop of torch.autograd.grad."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_sensitivity import per_sample_sensitivities
from tests.helpers import GRAD_MODES, ZOO, loop_reference


@pytest.mark.parametrize("mode", sorted(GRAD_MODES))
@pytest.mark.parametrize(
    "label", ["0.weight[3, 1]", "2.weight[15, 0]", "4.weight[2, 15]", "4.weight[0, 0]"], ids=lambda s: s
)
def test_one_linear_weight_element_matches_the_loop(label, mode, reference):
    torch.manual_seed(10)
    model = ZOO["mlp"][0]().double()
    x = torch.randn(6, 5, dtype=torch.float64)
    with GRAD_MODES[mode]():
        sens = per_sample_sensitivities(model, label, (x,))
    torch.testing.assert_close(sens[label], reference(model, [label], (x,))[label], rtol=0, atol=1e-12)


class Tied(nn.Module):
    """An embedding whose weight is also the output projection, and a Linear applied twice."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 5)
        self.mix = nn.Linear(5, 5)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens)  # [B, T, 5]
        h = torch.tanh(self.mix(torch.tanh(self.mix(h))))
        return nn.functional.linear(h, self.embed.weight)  # [B, T, 7]


@pytest.mark.parametrize("label", ["mix.weight[1, 4]", "embed.weight[2, 3]"])
def test_linear_weight_used_twice_and_tied(label, reference):
    torch.manual_seed(11)
    model = Tied().double()
    tokens = torch.randint(0, 7, (4, 3))
    with torch.inference_mode():
        sens = per_sample_sensitivities(model, label, (tokens,))
        both = per_sample_sensitivities(model, [label, "mix.bias[0]"], (tokens,))  # the vmap path
    expected = reference(model, [label], (tokens,))[label]
    assert sens[label].shape == (4, 3, 7)
    torch.testing.assert_close(sens[label], expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(both[label], expected, rtol=0, atol=1e-12)


def test_linear_weight_element_ignores_other_input_columns(reference):
    """d (x W^T)[:, i] / d W[i, j] is x[:, j]: an infinite x[:, k] with k != j must not leak in as 0 * inf."""
    model = nn.Sequential(nn.Linear(3, 2)).double()
    x = torch.tensor([[1.0, float("inf"), 2.0], [3.0, 4.0, 5.0]], dtype=torch.float64)
    sens = per_sample_sensitivities(model, "0.weight[1, 2]", (x,))
    assert torch.equal(sens["0.weight[1, 2]"], torch.tensor([[0.0, 2.0], [0.0, 5.0]], dtype=torch.float64))


@pytest.mark.parametrize("count", [1, 2], ids=["dual-numbers", "vmap"])
def test_one_hot_weight_element_reads_only_its_input(count):
    """d conv(x, W) / d W[o, i, kh, kw] is a slice of x[:, i]: infinities elsewhere in x stay out."""
    conv = nn.Conv2d(2, 2, 2).double()
    x = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    x[:, 0] = float("inf")
    targets = ["weight[1, 1, 0, 1]", "bias[0]"][:count]
    with torch.no_grad():
        sens = per_sample_sensitivities(conv, targets, (x,), method="forward")
    expected = torch.zeros(3, 2, 2, 2, dtype=torch.float64)
    expected[:, 1] = x[:, 1, 0:2, 1:3]
    assert torch.equal(sens["weight[1, 1, 0, 1]"], expected)
    lin = nn.Linear(3, 2).double()
    rows = torch.tensor([[1.0, float("inf"), 2.0], [3.0, 4.0, 5.0]], dtype=torch.float64)
    sens = per_sample_sensitivities(lin, ["weight[1, 2]", "bias[0]"][:count], (rows,))
    assert torch.equal(sens["weight[1, 2]"], torch.tensor([[0.0, 2.0], [0.0, 5.0]], dtype=torch.float64))


# ---- where the shortcut must step aside -----------------------------------------------------------------------


class Energy(nn.Module):
    """The output is ``dE/dx`` of a small network's energy, taken inside forward (forward over reverse):
    reverse mode there reads the saved operands of the linear layers, which must carry their tangents."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.out = nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            energy = self.out(torch.tanh(self.lin(x) * 1.5)).sum()
            return torch.autograd.grad(energy, x, create_graph=True)[0]


@pytest.mark.parametrize("mode", sorted(GRAD_MODES))
@pytest.mark.parametrize("targets", [["lin.weight[1, 2]"], ["lin.weight[1, 2]", "out.weight[0, 3]", "lin.bias[0]"]])
def test_backward_inside_forward_is_exact(targets, mode):
    torch.manual_seed(3)
    model, x = Energy().double(), torch.randn(5, 3, dtype=torch.float64)
    expected = loop_reference(model, targets, (x,))
    with GRAD_MODES[mode]():
        for _ in range(2):  # the second call knows the module runs a backward pass
            sens = per_sample_sensitivities(model, targets, (x,), method="forward")
            for label in targets:
                torch.testing.assert_close(sens[label], expected[label], rtol=0, atol=1e-12)


class InnerVmap(nn.Module):
    """A model that maps a linear layer over its samples with torch.func.vmap itself."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.9))
        self.lin = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.func.vmap(lambda row: self.lin(row * self.a) * 2.0)(x)


@pytest.mark.parametrize("targets", [["a"], ["lin.weight[1, 0]"], ["a", "lin.weight[1, 0]", "lin.bias[1]"]])
def test_transforms_inside_the_model_keep_torch_formulas(targets, reference):
    torch.manual_seed(4)
    model, x = InnerVmap().double(), torch.randn(4, 3, dtype=torch.float64)
    with torch.no_grad():
        sens = per_sample_sensitivities(model, targets, (x,), method="forward")
    for label, value in reference(model, targets, (x,)).items():
        torch.testing.assert_close(sens[label], value, rtol=0, atol=1e-12)


class ScalesItsWeight(nn.Module):
    """Updates its weight in place before using it: the weight's tangent is no longer the one-hot it was."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.lin.weight
        weight.mul_(2.0)
        return F.linear(x, weight, self.lin.bias)


def test_a_weight_updated_in_place_is_not_taken_for_one_hot():
    torch.manual_seed(5)
    x = torch.randn(4, 3, dtype=torch.float64)
    with torch.no_grad():
        for targets in (["lin.weight[1, 2]"], ["lin.weight[1, 2]", "lin.bias[0]"]):
            sens = per_sample_sensitivities(ScalesItsWeight().double(), targets, (x,), method="forward")
            expected = torch.zeros(4, 2, dtype=torch.float64)
            expected[:, 1] = 2 * x[:, 2]
            torch.testing.assert_close(sens["lin.weight[1, 2]"], expected, rtol=0, atol=1e-12)


# ---- real layers, dtypes and memory formats --------------------------------------------------------------------


class ResidualBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular")
        self.bn2 = nn.GroupNorm(2, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)) + h)
        return self.head(h.mean((2, 3)))


LABELS = ["conv1.weight[2, 1, 0, 2]", "bn1.weight[1]", "conv2.bias[3]", "head.weight[1, 0]"]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels-last"])
def test_residual_block_matches_the_loop(channels_last, train, reference):
    torch.manual_seed(6)
    model = ResidualBlock().double().train(train)
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-0.5, 0.5)
        model.bn1.running_var.uniform_(0.5, 2.0)
    x = torch.randn(3, 3, 5, 5, dtype=torch.float64)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    before = copy.deepcopy(model.state_dict())
    expected = reference(copy.deepcopy(model), LABELS, (x,))
    with torch.inference_mode():
        one = {label: per_sample_sensitivities(model, label, (x,))[label] for label in LABELS}
        several = per_sample_sensitivities(model, LABELS, (x,), chunk_size=3)
    for label in LABELS:
        torch.testing.assert_close(one[label], expected[label], rtol=0, atol=1e-12)
        torch.testing.assert_close(several[label], expected[label], rtol=0, atol=1e-12)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # training-mode running statistics stay private


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_low_precision_follows_float64(dtype):
    torch.manual_seed(7)
    model = ResidualBlock().eval()
    x = torch.randn(4, 3, 5, 5)
    exact = per_sample_sensitivities(model.double(), LABELS, (x.double(),))
    model = model.to(dtype)
    with torch.no_grad():
        one = {label: per_sample_sensitivities(model, label, (x.to(dtype),))[label] for label in LABELS}
        several = per_sample_sensitivities(model, LABELS, (x.to(dtype),))
    tolerance = 1e-5 if dtype == torch.float32 else 5e-2
    for label in LABELS:
        scale = exact[label].abs().max()
        for sens in (one[label], several[label]):
            assert sens.dtype == dtype
            assert (sens.double() - exact[label]).abs().max() <= tolerance * scale, label
