"""Uncertainty and identifiability from sums of products (``_identify.py``), against references: analytic
information of models linear in their constants, an exactly non-identifiable product, numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lightning_sensitivity import per_sample_sensitivities, predictive_std
from lightning_sensitivity._identify import covariance, estimate_correlation, fisher, identifiability, subsets
from lightning_sensitivity._targets import MAX_TARGETS, resolve_targets
from tests.helpers import loop_reference

D = torch.float64


def test_the_information_of_a_linear_model_is_x_transpose_x_over_sigma_squared():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=g, dtype=D)
    information = x.T @ x  # dy/dθ = x for y = x θ
    f = fisher(information, 0.5)
    torch.testing.assert_close(f, x.T @ x / 0.25)
    sigma, unbounded = covariance(f)
    torch.testing.assert_close(sigma, torch.linalg.inv(x.T @ x / 0.25), rtol=1e-12, atol=0)
    assert not unbounded.any()


def product_model() -> tuple[torch.Tensor, torch.Tensor]:
    """``y = a·b·x + c·x²`` at a = 2, b = 3: the sensitivities ``[N, 3]`` and θ."""
    x = torch.linspace(0.1, 2.0, 50, dtype=D)
    a, b = 2.0, 3.0
    return torch.stack([b * x, a * x, x**2], 1), torch.tensor([a, b, 0.5], dtype=D)


def test_an_exact_product_leaves_a_and_b_unbounded_and_c_exact():
    s, theta = product_model()
    sigma, unbounded = covariance(s.T @ s)
    assert unbounded.tolist() == [True, True, False]
    assert torch.isinf(sigma[:2]).all() and torch.isinf(sigma[:, :2]).all()
    x = s[:, 2].sqrt()
    reparametrised = torch.stack([x, x**2], 1)  # y = p x + c x², p = a·b: c's variance there is exact
    assert sigma[2, 2].item() == pytest.approx(
        torch.linalg.inv(reparametrised.T @ reparametrised)[1, 1].item(), rel=1e-9
    )
    report = identifiability(["a", "b", "c"], s.T @ s, s.T @ s, theta)
    flat = report["eigenvectors"][:, 0]  # the smallest eigenvalue: δ log a = -δ log b, c unmoved
    assert report["eigenvalues"][0] <= 1e-10 * report["eigenvalues"][-1]
    assert abs(float(flat[0] + flat[1])) < 1e-6 and abs(float(flat[2])) < 1e-6
    verdicts = " ".join(report["verdicts"])
    assert "only a¹·b¹ is determined" in verdicts and "along a¹·b⁻¹" in verdicts
    assert "a: its standard error is unbounded" in verdicts and "c: its" not in verdicts
    assert report["subsets"][("a", "b")] == math.inf and math.isfinite(report["subsets"][("a", "c")])
    assert set(report["subsets"]) == {("a", "b"), ("a", "c"), ("b", "c"), ("a", "b", "c")}


def test_a_target_without_effect_and_estimates_that_trade_off_are_said():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, generator=g, dtype=D)
    s = torch.stack([x, x + 1e-3 * torch.randn(30, generator=g, dtype=D), torch.zeros(30, dtype=D)], 1)
    report = identifiability(["p", "q", "dead"], s.T @ s, s.T @ s, torch.ones(3, dtype=D))
    verdicts = " ".join(report["verdicts"])
    assert "dead has no effect on the output" in verdicts
    assert "p and q trade off" in verdicts
    corr = estimate_correlation(covariance(s.T @ s)[0])
    assert corr[0, 1] < -0.95 and corr[2].isnan().all()  # estimates anti-correlated where sensitivities agree


def test_subsets_of_many_targets_are_the_most_collinear_and_say_so():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(200, 20, generator=g, dtype=D)
    s[:, 7] = s[:, 3] + 1e-4 * torch.randn(200, generator=g, dtype=D)
    labels = [f"t{i}" for i in range(20)]
    found, note = subsets(labels, s.T @ s)
    assert note is not None and "most collinear" in note
    assert max(found, key=lambda key: found[key]) in {("t3", "t7"), *(k for k in found if {"t3", "t7"} <= set(k))}
    assert len(found) <= 64


def test_predictive_std_is_the_delta_method_as_numpy_computes_it():
    g = torch.Generator().manual_seed(3)
    sens = {label: torch.randn(5, 4, generator=g) for label in ("a", "b", "c")}
    root = torch.randn(3, 3, generator=g, dtype=D)
    sigma = root @ root.T
    got = predictive_std(sens, (["a", "b", "c"], sigma))
    jac = np.stack([sens[k].numpy().astype(np.float64) for k in "abc"], -1)
    expected = np.sqrt(np.einsum("...i,ij,...j->...", jac, sigma.numpy(), jac))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)
    assert got.shape == (5, 4) and got.dtype == torch.float32
    sigma[0, 0] = sigma[0, 1] = sigma[1, 0] = math.inf  # a unbounded: inf only where a moves the output
    sens["a"][0] = 0.0
    got = predictive_std(sens, (["a", "b", "c"], sigma))
    assert torch.isinf(got[1:]).all() and torch.isfinite(got[0]).all()
    with pytest.raises(KeyError, match="no sensitivities for"):
        predictive_std({"a": sens["a"]}, (["a", "b"], sigma[:2, :2]))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4))
        self.blocks = nn.ModuleList([nn.Linear(4, 2), nn.Linear(4, 2)])

    def forward(self, x):
        h = torch.tanh(x @ self.w.T)
        return torch.cat([torch.tanh(block(torch.cat([h, h[:, :1]], 1))) for block in self.blocks], 1)


def test_whole_tensor_and_slice_targets_expand_row_major_and_are_exact():
    torch.manual_seed(0)
    model, x = Net().double(), torch.randn(6, 4, dtype=D)
    assert [t.label for t in resolve_targets(model, "w[1, :]", "api")] == [f"w[1, {j}]" for j in range(4)]
    assert [t.label for t in resolve_targets(model, "w[:, -1]", "api")] == [f"w[{i}, 3]" for i in range(3)]
    assert [t.label for t in resolve_targets(model, "w[0:3:2, 1:3]", "api")] == [
        "w[0, 1]",
        "w[0, 2]",
        "w[2, 1]",
        "w[2, 2]",
    ]
    every = [t.label for t in resolve_targets(model, "blocks.*.bias[...]", "api")]
    assert every == ["blocks.0.bias[0]", "blocks.0.bias[1]", "blocks.1.bias[0]", "blocks.1.bias[1]"]
    sens = per_sample_sensitivities(model, ["w[...]", "blocks.1.weight[0, :]"], (x,))
    assert list(sens)[:4] == ["w[0, 0]", "w[0, 1]", "w[0, 2]", "w[0, 3]"] and len(sens) == 12 + 4
    expected = loop_reference(model, list(sens), (x,))
    for label, value in sens.items():
        torch.testing.assert_close(value, expected[label], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    ("target", "error", "words"),
    [
        ("w[5, :]", IndexError, ["'w[5, :]'", "out of range"]),
        ("w[:, :, :]", IndexError, ["3 index(es)", "2 dimension(s)"]),
        ("w[2:2, :]", IndexError, ["selects no element"]),
        ("w[..., ...]", ValueError, ["'...' more than once"]),
        ("w[x, :]", ValueError, ["slices", "'w[...]'"]),
    ],
)
def test_bad_slices_are_refused_with_the_target_named(target, error, words):
    with pytest.raises(error) as raised:
        resolve_targets(Net(), target, "api")
    for word in words:
        assert word in str(raised.value)


def test_too_many_elements_are_refused_with_the_count():
    big = nn.Linear(80, 80)
    with pytest.raises(
        ValueError, match=rf"'weight\[\.\.\.\]' brings the targets to 6400 scalars, more than {MAX_TARGETS}"
    ):
        resolve_targets(big, "weight[...]", "api")
    assert len(resolve_targets(big, ["weight[0:40, :]"], "api")) == 3200
