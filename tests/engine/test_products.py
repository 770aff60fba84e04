"""Products, normalisations and arithmetic whose tangent ``_products.Products`` computes itself, against the
per-sample loop of torch.autograd.grad, on both ways of pushing tangents (dual numbers for one target, vmap
over jvp for several) and in every grad mode; and how many products they run."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.profiler import profile

import lightning_sensitivity._products as products
from lightning_sensitivity import per_sample_sensitivities
from tests.helpers import GRAD_MODES, loop_reference


class Probe(nn.Module):
    """``op(x * (a + 0.1 * weight.sum()), weight, bias)``: target ``a`` gives the op's input a tangent and its
    weight none; an element of ``weight`` gives the weight a one-hot tangent and the input one too."""

    def __init__(self, op, weight: tuple[int, ...], bias: tuple[int, ...] | None, positive: bool = False):
        super().__init__()
        self.op = op
        self.a = nn.Parameter(torch.tensor(1.3))
        self.weight = nn.Parameter(torch.rand(weight) + 0.5 if positive else torch.randn(weight))
        self.bias = None if bias is None else nn.Parameter(torch.randn(bias))
        self.register_buffer("running_mean", torch.randn(weight) * 0.3)
        self.register_buffer("running_var", torch.rand(weight) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(self, x * self.a, x * (self.a + 0.1 * self.weight.sum()))


#: name -> (op(module, x with a tangent from ``a`` only, x with tangents from ``a`` and ``weight``), x shape,
#: weight shape, bias shape, weight index, bias index)
CASES = {
    "linear": (lambda m, x, _: F.linear(x, m.weight, m.bias), (3, 4), (5, 4), (5,)),
    "linear-3d-twice": (
        lambda m, x, xw: F.linear(x, m.weight, m.bias) + F.linear(xw, m.weight),
        (2, 3, 4),
        (5, 4),
        (5,),
    ),
    "conv1d": (lambda m, x, _: F.conv1d(x, m.weight, m.bias, stride=2, padding=1), (2, 2, 7), (3, 2, 3), (3,)),
    "conv2d-strided-dilated-grouped": (
        lambda m, x, _: F.conv2d(x, m.weight, m.bias, stride=(2, 1), padding=(2, 1), dilation=(2, 1), groups=2),
        (2, 4, 7, 5),
        (6, 2, 3, 3),
        (6,),
    ),
    "conv2d-same-even-kernel": (
        lambda m, x, _: F.conv2d(x, m.weight, m.bias, padding="same", dilation=(1, 2)),
        (2, 2, 5, 6),
        (3, 2, 4, 2),
        (3,),
    ),
    "conv2d-valid": (lambda m, x, _: F.conv2d(x, m.weight, None, padding="valid"), (2, 2, 4, 5), (3, 2, 2, 3), None),
    "conv2d-reflect-channels-last": (
        lambda m, x, _: F.conv2d(
            F.pad(x, (1, 1, 1, 1), mode="reflect").contiguous(memory_format=torch.channels_last), m.weight, m.bias
        ),
        (2, 2, 4, 4),
        (3, 2, 3, 3),
        (3,),
    ),
    "conv2d-unbatched-used-twice": (
        lambda m, x, xw: F.conv2d(x, m.weight, m.bias, padding=1) + F.conv2d(xw, m.weight, padding=1),
        (2, 4, 4),
        (2, 2, 3, 3),
        (2,),
    ),
    "conv3d": (
        lambda m, x, _: F.conv3d(x, m.weight, m.bias, padding=(1, 0, 1)),
        (2, 2, 3, 4, 3),
        (2, 2, 2, 3, 2),
        (2,),
    ),
    "conv-transpose1d": (
        lambda m, x, _: F.conv_transpose1d(x, m.weight, m.bias, stride=2, padding=1, output_padding=1),
        (2, 2, 4),
        (2, 3, 3),
        (3,),
    ),
    "conv-transpose2d-grouped": (
        lambda m, x, xw: (
            F.conv_transpose2d(x, m.weight, m.bias, stride=2, groups=2, dilation=2)
            + F.conv_transpose2d(xw, m.weight, groups=2, stride=2, dilation=2)
        ),
        (2, 4, 3, 3),
        (4, 1, 3, 2),
        (2,),
    ),
    "conv-transpose3d": (
        lambda m, x, _: F.conv_transpose3d(x, m.weight, m.bias),
        (2, 2, 2, 3, 2),
        (2, 2, 2, 2, 2),
        (2,),
    ),
    "matmul": (lambda m, x, xw: x @ m.weight + torch.matmul(xw, m.weight) + m.bias, (2, 3, 4), (4, 5), (5,)),
    "matmul-method-left": (lambda m, x, _: m.weight.matmul(x.transpose(0, 1)).T, (3, 4), (5, 4), None),
    "mm": (lambda m, x, _: torch.mm(x, m.weight), (3, 4), (4, 5), None),
    "bmm": (lambda m, x, xw: torch.bmm(x, m.weight) + xw.bmm(m.weight), (2, 3, 4), (2, 4, 5), None),
    "mv": (lambda m, x, _: torch.mv(x, m.weight), (3, 4), (4,), None),
    "addmm": (lambda m, x, _: torch.addmm(m.bias, x, m.weight, beta=0.5, alpha=2.0), (3, 4), (4, 5), (5,)),
    "addmm-method": (lambda m, x, _: m.bias.addmm(x, m.weight), (3, 4), (4, 5), (3, 5)),
    "baddbmm": (lambda m, x, _: torch.baddbmm(m.bias, x, m.weight, beta=-1.0, alpha=0.5), (2, 3, 4), (2, 4, 5), (5,)),
    "addbmm": (lambda m, x, _: torch.addbmm(m.bias, x.transpose(0, 1), m.weight), (3, 2, 4), (2, 4, 5), (5,)),
    "addmv": (lambda m, x, _: torch.addmv(m.bias, x, m.weight, alpha=3.0), (3, 4), (4,), (3,)),
    "einsum": (lambda m, x, _: torch.einsum("bij,jk->bik", x, m.weight) + m.bias, (2, 3, 4), (4, 5), (5,)),
    "einsum-list": (lambda m, x, xw: torch.einsum("bi,bi,i->b", [x, xw, m.weight]), (3, 4), (4,), None),
    "tensordot": (lambda m, x, _: torch.tensordot(x, m.weight, dims=([2], [0])), (2, 3, 4), (4, 5), None),
    "mul-add": (lambda m, x, _: x * m.weight + m.bias - 2.0 * x, (3, 4), (4,), (3, 4)),
    "div-both-sides": (lambda m, x, _: x / m.weight + m.bias / (x.abs() + 1) + 3.0 / (x.abs() + 1), (3, 4), (4,), (4,)),
    "alpha-and-reversed": (
        lambda m, x, _: (
            torch.add(x, m.weight, alpha=-1.5) + torch.sub(m.bias, x, alpha=2.0) + (1.0 - x) + torch.rsub(x, m.bias)
        ),
        (3, 4),
        (4,),
        (3, 4),
    ),
    "broadcast": (lambda m, x, _: x[:, :1] + m.weight + x[:, :1] * m.bias, (3, 4), (3, 4), (1, 4)),
    "in-place": (lambda m, x, _: _in_place(x, m.weight, m.bias), (3, 4), (4,), (4,)),
    "batch-norm-eval": (
        lambda m, x, _: F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, training=False),
        (3, 4, 5),
        (4,),
        (4,),
    ),
    "batch-norm-batch-statistics": (
        lambda m, x, _: F.batch_norm(x, None, None, m.weight, m.bias, training=True),
        (3, 4, 2),
        (4,),
        (4,),
    ),
    "gelu-silu": (
        lambda m, x, _: F.gelu(x * m.weight) + F.gelu(x + m.bias, approximate="tanh") + F.silu(x),
        (3, 4),
        (4,),
        (4,),
    ),
    "layer-norm": (lambda m, x, _: F.layer_norm(x, (2, 4), m.weight, m.bias), (3, 2, 4), (2, 4), (2, 4)),
    "group-norm": (lambda m, x, _: F.group_norm(x, 2, m.weight, m.bias), (3, 4, 5), (4,), (4,)),
}


POSITIVE = {"div-both-sides"}


def _in_place(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    y = x.clone()
    y.mul_(weight)
    y += bias
    y.div_(2.0)
    y.sub_(weight, alpha=0.5)
    return y


def _targets(model: Probe) -> list[list[str]]:
    weight = "weight[" + ", ".join(str(s - 1) for s in model.weight.shape) + "]"
    sets = [["a"], [weight]]
    if model.bias is not None:
        sets.append(["bias[" + ", ".join("0" for _ in model.bias.shape) + "]"])
    sets.append([label for labels in sets for label in labels])
    return sets


def _probe(name: str) -> tuple[Probe, Tensor]:
    op, x_shape, weight, bias = CASES[name]
    torch.manual_seed(0)
    model = Probe(op, weight, bias, positive=name in POSITIVE).double()
    return model, torch.randn(x_shape, dtype=torch.float64)


@pytest.fixture
def routed(monkeypatch) -> list[str]:
    """The rules (``_product``, ``_einsum``, ``_arithmetic``, ``_norm``) that computed a tangent themselves."""
    calls: list[str] = []
    original = products._dual

    def spy(primal, tangent):
        calls.append(sys._getframe(1).f_code.co_name)
        return original(primal, tangent)

    monkeypatch.setattr(products, "_dual", spy)
    return calls


def _rules(name: str) -> set[str]:
    """The rules that must have computed a tangent in case ``name``."""
    if "norm" in name:
        return {"_norm"}
    if name.startswith(("linear", "conv", "mm", "bmm", "mv", "add", "baddbmm", "matmul", "tensordot")):
        return {"_product"}
    if name.startswith("einsum"):
        return {"_einsum"}
    return {"_arithmetic"}


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
@pytest.mark.parametrize("name", sorted(CASES))
def test_every_rerouted_op_matches_the_loop(name, routed):
    model, x = _probe(name)
    before = copy.deepcopy(model.state_dict())
    for targets in _targets(model):
        expected = loop_reference(model, targets, (x,))
        for mode, grad_mode in GRAD_MODES.items():
            routed.clear()
            with grad_mode():
                sens = per_sample_sensitivities(model, targets, (x,), method="forward")
            for label in targets:
                torch.testing.assert_close(sens[label], expected[label], rtol=1e-9, atol=1e-10, msg=f"{mode} {label}")
            # The input alone carries a tangent, the weight of a linear or conv layer a one-hot one, or a
            # normalisation any single one: the rule's own way. Elsewhere both factors of a product may carry
            # tangents, and the op's own formula is the right one.
            one_hot = len(targets) == 1 and "weight" in targets[0] and name.startswith(("lin", "conv2d"))
            if targets == ["a"] or one_hot or ("norm" in name and len(targets) == 1):
                assert _rules(name) <= set(routed), f"{name}: {targets} under {mode}: only {set(routed)}"
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


# ---- how many products run ----------------------------------------------------------------------------------


def _count(function, *names: str) -> int:
    with profile() as prof:
        function()
    return sum(event.count for event in prof.key_averages() if event.key in names)


class Stack(nn.Module):
    """A scalar ``a`` in front of a convolution and two linear layers."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.7))
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.lin1 = nn.Linear(12, 6)
        self.lin2 = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.conv(x * self.a)).flatten(1)
        return self.lin2(torch.tanh(self.lin1(h[:, :12])))


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_one_product_per_tangent(mode):
    """With a tangent on the input only, a convolution or linear layer costs two products (primal, tangent),
    and the target's own layer, whose weight carries a one-hot tangent, one."""
    torch.manual_seed(1)
    model, x = Stack(), torch.randn(4, 2, 2, 2)
    convs = ("aten::_convolution",)  # once per convolution run, batched or not
    products_ = ("aten::mm", "aten::addmm", "aten::bmm")
    with GRAD_MODES[mode]():
        run = lambda t: per_sample_sensitivities(model, t, (x,), method="forward")  # noqa: E731
        run("a")
        assert _count(lambda: run("a"), *convs) == 2
        assert _count(lambda: run("a"), *products_) == 4
        assert _count(lambda: run("conv.weight[2, 1, 0, 2]"), *convs) == 1
        assert _count(lambda: run("lin1.weight[5, 11]"), *products_) == 1 + 2
        # vmap over three tangents: still one batched product per layer for the tangents
        assert _count(lambda: run(["a", "conv.bias[1]", "lin1.bias[0]"]), *convs) == 2


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(4, 12)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return torch.softmax(q @ k.transpose(-2, -1) / 2.0, dim=-1) @ v


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_both_factors_carrying_tangents_keep_both_terms(mode, reference):
    """q @ k^T with tangents on both factors needs both products: torch's own formula, three in all."""
    torch.manual_seed(2)
    model, x = Attention().double(), torch.randn(2, 3, 4, dtype=torch.float64)
    labels = ["qkv.weight[1, 2]", "qkv.weight[5, 0]", "qkv.bias[9]"]
    expected = reference(model, labels, (x,))
    with GRAD_MODES[mode]():
        one = {label: per_sample_sensitivities(model, label, (x,))[label] for label in labels}
        several = per_sample_sensitivities(model, labels, (x,))
        assert _count(lambda: per_sample_sensitivities(model, "qkv.weight[1, 2]", (x,)), "aten::bmm") == 2 * 3
    for label in labels:
        torch.testing.assert_close(one[label], expected[label], rtol=0, atol=1e-12)
        torch.testing.assert_close(several[label], expected[label], rtol=0, atol=1e-12)


class ScaledAttention(nn.Module):
    """``nn.MultiheadAttention`` on ``a * x``: its projections run inside ``F.multi_head_attention_forward``."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.8))
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.attn(x * self.a, x, x, need_weights=False)[0]


def test_products_inside_multi_head_attention(reference):
    """The mode stays on inside ``F.multi_head_attention_forward``: its input projection, whose input carries a
    tangent, runs two products (primal, tangent), not three."""
    torch.manual_seed(8)
    model, x = ScaledAttention().double().eval(), torch.randn(2, 3, 8, dtype=torch.float64)
    labels = ["a", "attn.in_proj_weight[9, 2]", "attn.out_proj.bias[1]"]
    expected = reference(model, labels, (x,))
    with torch.no_grad():
        one = {label: per_sample_sensitivities(model, label, (x,))[label] for label in labels}
        several = per_sample_sensitivities(model, labels, (x,))
        in_projection = _count(lambda: per_sample_sensitivities(model, "a", (x,)), "aten::mm", "aten::addmm")
    for label in labels:
        torch.testing.assert_close(one[label], expected[label], rtol=0, atol=1e-12)
        torch.testing.assert_close(several[label], expected[label], rtol=0, atol=1e-12)
    # query (a * x: primal and tangent), key and value (x, one product for both, no tangent), output projection
    assert in_projection == 2 + 1 + 2
