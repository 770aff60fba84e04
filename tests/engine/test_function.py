"""per_sample_sensitivities against the per-sample loop of torch.autograd.grad: the model zoo in every grad
mode, float64, chunks, keyword arguments, frozen and buffer targets, what it returns and what it refuses."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from lightning_sensitivity import per_sample_sensitivities
from tests.helpers import GRAD_MODES, ZOO, Decay, Encoder, Oscillator, Scale, assert_untouched, inputs, snapshot


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


@pytest.mark.parametrize("normalize", ["none", "parameter", "relative"])
def test_function_normalize(normalize):
    model = Decay()
    x = inputs()
    with torch.inference_mode():
        sens = per_sample_sensitivities(model, ["A", "k"], (x,), normalize=normalize)
    exact = model.analytic(x)
    y = model(x).detach().double()
    for label, theta in (("A", 2.0), ("k", 0.7)):
        factor = {"none": 1.0, "parameter": theta, "relative": theta / y}[normalize]
        torch.testing.assert_close(sens[label].double(), factor * exact[label], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="normalize"):
        per_sample_sensitivities(model, "A", (x,), normalize="log")


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
