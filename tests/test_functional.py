"""per_sample_sensitivities against the per-sample loop of torch.autograd.grad."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import ZOO, Attention, Encoder, Oscillator, Recurrent, Scale
from torch import Tensor, nn

from lightning_sensitivity import DEFAULT_PLANS, per_sample_sensitivities

GRAD_MODES = {
    "grad": torch.enable_grad,
    "no_grad": torch.no_grad,
    "inference_mode": torch.inference_mode,
}


def snapshot(module: nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()},
        "requires_grad": {k: p.requires_grad for k, p in module.named_parameters()},
        "grad": {k: None if p.grad is None else p.grad.clone() for k, p in module.named_parameters()},
        "training": [m.training for m in module.modules()],
    }


def assert_untouched(module: nn.Module, before: dict) -> None:
    after = snapshot(module)
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
    assert after["requires_grad"] == before["requires_grad"]
    assert after["training"] == before["training"]
    for key, grad in before["grad"].items():
        assert (grad is None) == (after["grad"][key] is None), key
        if grad is not None:
            assert torch.equal(grad, after["grad"][key]), key


@pytest.mark.parametrize("mode", sorted(GRAD_MODES))
def test_zoo_matches_loop_reference(zoo_case, mode, reference):
    name, model, args, targets, labels = zoo_case
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # every zoo model runs in forward mode, no fallback
        with GRAD_MODES[mode]():
            sens = per_sample_sensitivities(model, targets, args)
    expected = reference(model, labels, args)
    assert list(sens) == labels
    for label in labels:
        out = sens[label]
        assert out.shape == expected[label].shape
        assert out.dtype == torch.float32 and not out.requires_grad
        torch.testing.assert_close(out, expected[label], rtol=1e-4, atol=1e-5, msg=f"{name}: {label}")
        assert out.abs().sum() > 0, f"{name}: {label} is all zeros"
    assert_untouched(model, before)


@pytest.mark.parametrize("targets", [["C"], ["C", "unused"]])
def test_module_built_under_inference_mode(targets):
    """Parameters that are inference tensors still carry tangents, by dual numbers (one target) or vmap."""
    x = torch.arange(6.0)
    with torch.inference_mode():
        model = Scale(-5.0)
        model.register_buffer("unused", torch.tensor(2.0))
        sens = per_sample_sensitivities(model, targets, (x,))
    assert torch.equal(sens["C"], x)


def test_seed_problem_is_x():
    x = torch.arange(10.0)
    with torch.inference_mode():
        sens = per_sample_sensitivities(Scale(-5.0), "C", (x,))
    assert torch.equal(sens["C"], x)


@pytest.mark.parametrize("name", ["mlp", "oscillator", "glob", "conv-bn-eval"])
def test_float64_agrees_to_1e10(name, reference):
    make_model, make_args, targets, labels = ZOO[name]
    torch.manual_seed(1)
    model = make_model().double().eval()
    args = tuple(a.double() for a in make_args())
    with torch.no_grad():
        sens = per_sample_sensitivities(model, targets, args)
    expected = reference(model, labels, args)
    for label in labels:
        assert sens[label].dtype == torch.float64
        torch.testing.assert_close(sens[label], expected[label], rtol=0, atol=1e-10)


def test_oscillator_matches_float64_finite_differences():
    torch.manual_seed(2)
    model = Oscillator().double()
    x0 = torch.randn(5, 2, dtype=torch.float64)
    sens = per_sample_sensitivities(model, ["k", "c"], (x0,))
    for name in ("k", "c"):
        param = getattr(model, name)
        h = 1e-6
        with torch.no_grad():
            param += h
            up = model(x0)
            param -= 2 * h
            down = model(x0)
            param += h
        torch.testing.assert_close(sens[name], (up - down) / (2 * h), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 100])
def test_chunking_gives_the_same_answer(chunk_size):
    torch.manual_seed(3)
    net = ZOO["mlp"][0]().double()
    x = torch.randn(9, 5, dtype=torch.float64)
    targets = [f"0.weight[{i}, {j}]" for i in range(4) for j in range(2)] + ["4.bias[1]"]
    whole = per_sample_sensitivities(net, targets, (x,))
    chunked = per_sample_sensitivities(net, targets, (x,), chunk_size=chunk_size)
    assert list(whole) == list(chunked)
    for label in whole:
        torch.testing.assert_close(chunked[label], whole[label], rtol=0, atol=1e-12)


def test_kwargs_and_single_tensor_args(reference):
    torch.manual_seed(4)
    model = Encoder().eval()
    x = torch.randn(3, 4, 8)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[0, -1] = True  # the padding-mask path goes through nested tensors in the fused kernel
    label = "encoder.layers.1.linear2.weight[2, 5]"
    with torch.inference_mode():
        sens = per_sample_sensitivities(model, label, (x,), {"mask": mask})
    expected = reference(model, [label], (x,), {"mask": mask})
    torch.testing.assert_close(sens[label], expected[label], rtol=1e-4, atol=1e-6)
    same = per_sample_sensitivities(Scale(), "C", torch.arange(3.0))
    assert torch.equal(same["C"], torch.arange(3.0))


def test_untouched_after_training_mode_batchnorm_and_existing_grads(reference):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh()).train()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    model[1].bias.requires_grad_(False)
    x = torch.randn(6, 3)
    before = snapshot(model)
    expected = reference(model, ["0.weight[0, 0]", "1.bias[2]"], (x,))
    with torch.no_grad():
        sens = per_sample_sensitivities(model, ["0.weight[0, 0]", "1.bias[2]"], (x,))
    assert_untouched(model, before)
    for label, value in expected.items():
        torch.testing.assert_close(sens[label], value, rtol=1e-4, atol=1e-5)


def test_frozen_parameter_and_buffer_targets(reference):
    model = Oscillator()
    model.k.requires_grad_(False)
    x0 = torch.randn(4, 2)
    with torch.inference_mode():
        sens = per_sample_sensitivities(model, ["k", "m", "F[0]"], (x0,))
    expected = reference(model, ["k", "m", "F[0]"], (x0,))
    for label in ("k", "m", "F[0]"):
        torch.testing.assert_close(sens[label], expected[label], rtol=1e-4, atol=1e-6)
    assert not model.k.requires_grad


def test_unused_target_gives_zeros():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    model.register_buffer("unused", torch.tensor(1.0))
    for method in ("forward", "reverse"):
        sens = per_sample_sensitivities(model, ["unused"], (torch.randn(4, 3),), method=method)
        assert torch.equal(sens["unused"], torch.zeros(4, 2))


# ---- fallbacks -------------------------------------------------------------------------------------------


class SineNoJvp(torch.autograd.Function):
    """A custom Function with a backward but no forward-mode formula."""

    @staticmethod
    def forward(x):
        return x.sin()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * x.cos()


class SineOldStyle(torch.autograd.Function):
    """An old-style custom Function (no setup_context): no torch.func transform accepts it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.sin()

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * x.cos()


class SineJvpNoVmap(SineNoJvp):
    """The same with a jvp but no vmap rule: forward mode works one tangent at a time."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def jvp(ctx, tangent):
        (x,) = ctx.saved_tensors
        return tangent * x.cos()


class WithFunction(nn.Module):
    def __init__(self, function):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.function = function

    def forward(self, x: Tensor) -> Tensor:
        return self.function.apply(self.lin(x))


class PairwiseDistance(nn.Module):
    def __init__(self):
        super().__init__()
        self.centres = nn.Parameter(torch.randn(4, 3))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cdist(x, self.centres)


FALLBACKS = {
    "custom-no-jvp": lambda: WithFunction(SineNoJvp),
    "custom-old-style": lambda: WithFunction(SineOldStyle),
    "cdist": PairwiseDistance,
}


@pytest.mark.parametrize("count", [1, 2], ids=["dual-numbers", "vmap"])
@pytest.mark.parametrize("mode", sorted(GRAD_MODES))
@pytest.mark.parametrize("name", sorted(FALLBACKS))
def test_auto_falls_back_to_reverse_with_one_warning(name, mode, count, reference):
    torch.manual_seed(6)
    model = FALLBACKS[name]()
    targets = ["lin.weight[1, 2]", "lin.bias[0]"] if name != "cdist" else ["centres[2, 1]", "centres[0, 0]"]
    targets = targets[:count]
    x = torch.randn(5, 3)
    before = snapshot(model)
    with GRAD_MODES[mode](), pytest.warns(UserWarning, match="falling back to batched reverse mode") as record:
        first = per_sample_sensitivities(model, targets, (x,))
    messages = [str(w.message) for w in record if "falling back" in str(w.message)]
    assert len(messages) == 1 and type(model).__name__ in messages[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # once per module
        with GRAD_MODES[mode]():
            second = per_sample_sensitivities(model, targets, (x,), chunk_size=3)
    expected = reference(model, list(first), (x,))
    for label, value in expected.items():
        torch.testing.assert_close(first[label], value, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(second[label], value, rtol=1e-5, atol=1e-6)
    assert_untouched(model, before)


def test_cdist_warning_names_the_op():
    with pytest.warns(UserWarning, match="_cdist_forward"):
        per_sample_sensitivities(PairwiseDistance(), "centres[0, 0]", (torch.randn(2, 3),))


def test_forward_method_raises_where_auto_falls_back():
    with pytest.raises(RuntimeError, match="method='auto'"):
        per_sample_sensitivities(PairwiseDistance(), "centres[0, 0]", (torch.randn(2, 3),), method="forward")


def test_jvp_without_vmap_rule_stays_in_forward_mode(reference):
    torch.manual_seed(7)
    model = WithFunction(SineJvpNoVmap)
    x = torch.randn(4, 3)
    targets = ["lin.weight[0, 1]", "lin.bias[1]"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        with torch.inference_mode():
            sens = per_sample_sensitivities(model, targets, (x,))
    assert DEFAULT_PLANS[model].reverse is False and DEFAULT_PLANS[model].vectorise is False
    for label, value in reference(model, targets, (x,)).items():
        torch.testing.assert_close(sens[label], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_factory", [lambda: Recurrent("LSTM"), Attention, Encoder], ids=["lstm", "mha", "te"])
def test_fast_paths_are_avoided_not_fallen_back_from(model_factory, reference):
    """Fused CPU kernels without forward-mode formulas are steered around; flags are restored after."""
    torch.manual_seed(8)
    model = model_factory().eval()
    for p in model.parameters():
        p.requires_grad_(False)  # makes the attention fast path eligible even with grad on
    label = next(n for n, _ in model.named_parameters()) + "[0, 0]"
    x = torch.randn(2, 3, 8 if not isinstance(model, Recurrent) else 3)
    mkldnn, fastpath = torch.backends.mkldnn.enabled, torch.backends.mha.get_fastpath_enabled()
    with torch.inference_mode():
        sens = per_sample_sensitivities(model, label, (x,))
    assert DEFAULT_PLANS[model].reverse is False
    assert (torch.backends.mkldnn.enabled, torch.backends.mha.get_fastpath_enabled()) == (mkldnn, fastpath)
    torch.testing.assert_close(sens[label], reference(model, [label], (x,))[label], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["mlp", "oscillator", "lstm", "glob"])
def test_reverse_method_matches_forward(name):
    make_model, make_args, targets, labels = ZOO[name]
    torch.manual_seed(9)
    model = make_model().double().eval()
    args = tuple(a.double() for a in make_args())
    with torch.inference_mode():
        forward = per_sample_sensitivities(model, targets, args, method="forward")
        reverse = per_sample_sensitivities(model, targets, args, method="reverse", chunk_size=5)
    for label in labels:
        torch.testing.assert_close(reverse[label], forward[label], rtol=0, atol=1e-10)


# ---- bad calls -------------------------------------------------------------------------------------------


class TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        return self.w * x, x


class ScalarOut(TupleOut):
    def forward(self, x):
        return (self.w * x).sum()


@pytest.mark.parametrize("method", ["auto", "forward", "reverse"])
def test_output_must_be_a_tensor_with_a_sample_dimension(method):
    with pytest.raises(TypeError, match="returned tuple"):
        per_sample_sensitivities(TupleOut(), "w", (torch.ones(3),), method=method)
    with pytest.raises(ValueError, match="0-dim"):
        per_sample_sensitivities(ScalarOut(), "w", (torch.ones(3),), method=method)


@pytest.mark.parametrize(("kwargs", "match"), [({"method": "jacrev"}, "method"), ({"chunk_size": 0}, "chunk_size")])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        per_sample_sensitivities(Scale(), "C", (torch.ones(2),), **kwargs)


def test_result_follows_output_dtype_and_model_is_copy_safe():
    model = Scale().double()
    sens = per_sample_sensitivities(copy.deepcopy(model), "C", (torch.ones(2, dtype=torch.float64),))
    assert sens["C"].dtype == torch.float64


# ---- one element of a weight that F.linear uses: no dense one-hot product -----------------------------


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
