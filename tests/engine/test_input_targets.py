"""Inputs and initial conditions as targets: dy_i/dx_ij, sample i's output with respect to its own input, in
every mode, against analytic partial derivatives and the loop of ``torch.autograd.grad``."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from lightning_sensitivity import per_sample_sensitivities
from tests.helpers import Ishigami, ishigami_partials, points

D = torch.float64


@pytest.mark.parametrize("method", ["auto", "forward", "reverse"])
@pytest.mark.parametrize("chunk_size", [None, 1])
def test_ishigami_partials_are_exact_in_every_mode(method, chunk_size):
    x = points()
    sens = per_sample_sensitivities(
        Ishigami(), ["args[0][:, ...]", "a"], (x,), method=method, chunk_size=chunk_size, verify=True
    )
    assert list(sens) == ["args[0][:, 0]", "args[0][:, 1]", "args[0][:, 2]", "a"]
    for j, expected in enumerate(ishigami_partials(x)):
        torch.testing.assert_close(sens[f"args[0][:, {j}]"], expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sens["a"], torch.sin(x[:, 1]) ** 2)
    assert torch.equal(x, points())  # the caller's input as given


class Growth(nn.Module):
    """Logistic growth from each sample's own initial population ``y0 [B]`` at times ``t [T]``."""

    def __init__(self) -> None:
        super().__init__()
        self.K = nn.Parameter(torch.tensor(10.0, dtype=D))
        self.r = nn.Parameter(torch.tensor(0.8, dtype=D))

    def forward(self, t: Tensor, y0: Tensor) -> Tensor:
        decay = torch.exp(-self.r * t)[None, :]
        return self.K * y0[:, None] / (y0[:, None] + (self.K - y0[:, None]) * decay)


def test_the_initial_condition_of_logistic_growth_per_sample():
    t = torch.linspace(0, 5, 11, dtype=D)
    y0 = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=D)
    model = Growth()
    for args, kwargs, label in (((t, y0), None, "args[1]"), ((t,), {"y0": y0}, "kwargs['y0']")):
        sens = per_sample_sensitivities(model, [label, "r"], args, kwargs, verify=True)
        e = torch.exp(-0.8 * t)[None, :]
        denominator = y0[:, None] + (10.0 - y0[:, None]) * e
        torch.testing.assert_close(sens[label], 100.0 * e / denominator**2, rtol=1e-12, atol=1e-14)


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, dtype=D))

    def forward(self, batch: dict) -> Tensor:
        return torch.tanh(batch["x"].flatten(1) @ self.w.repeat(5, 1)) * batch["scale"][:, None]


def test_deeper_paths_against_the_loop_of_autograd_grad():
    torch.manual_seed(0)
    x, scale = torch.randn(6, 4, 5, dtype=D), torch.rand(6, dtype=D)
    model = Nested()
    sens = per_sample_sensitivities(
        model, ["args[0]['x'][:, 2, 3]", "args[0]['scale']", "w[1, 2]"], ({"x": x, "scale": scale},)
    )
    for name, element in (("x", (2, 3)), ("scale", ())):
        leaf = {"x": x.clone().requires_grad_(), "scale": scale.clone().requires_grad_()}
        with torch.enable_grad():
            out = model(leaf)
            expected = torch.zeros_like(out)
            for i in range(out.shape[0]):
                for o in range(out.shape[1]):
                    (grad,) = torch.autograd.grad(out[i, o], leaf[name], retain_graph=True)
                    expected[i, o] = grad[(i, *element)]
        label = "args[0]['x'][:, 2, 3]" if name == "x" else "args[0]['scale']"
        torch.testing.assert_close(sens[label], expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.inference_mode, torch.enable_grad])
def test_input_targets_in_every_grad_mode(grad_mode):
    x = points(16)
    with grad_mode():
        sens = per_sample_sensitivities(Ishigami(), "args[0][:, 2]", (x,))
    torch.testing.assert_close(sens["args[0][:, 2]"], ishigami_partials(x)[2])
    assert not sens["args[0][:, 2]"].requires_grad


def test_normalised_input_targets_use_each_samples_own_value():
    x = points(16)
    sens = per_sample_sensitivities(Ishigami(), "args[0][:, 0]", (x,), normalize="relative")
    y = Ishigami()(x).detach()
    torch.testing.assert_close(sens["args[0][:, 0]"], ishigami_partials(x)[0] * x[:, 0] / y)


def test_a_model_that_mixes_samples_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).double().train()
    with pytest.raises(ValueError, match=r"mixes samples.*'args\[0\]\[:, 1\]'.*its own input"):
        per_sample_sensitivities(model, "args[0][:, 1]", (torch.randn(8, 3, dtype=D),))
    per_sample_sensitivities(model.eval(), "args[0][:, 1]", (torch.randn(8, 3, dtype=D),))  # eval: per sample


@pytest.mark.parametrize(
    ("target", "error", "words"),
    [
        ("args[1][:, 0]", ValueError, ["'args[1][:, 0]'", "holds 1 elements"]),
        ("args[0][:, 7]", IndexError, ["out of range", "each sample of args[0]"]),
        ("kwargs['y0']", ValueError, ["no key 'y0'"]),
        ("args[0]", ValueError, ["3 elements per sample", "'args[0][:, 0]'"]),
        ("args[0][2, :]", ValueError, ["first index", "':'"]),
        ("args", ValueError, ["names all of args"]),
    ],
)
def test_bad_input_targets_are_refused_with_the_target_named(target, error, words):
    with pytest.raises(error) as raised:
        per_sample_sensitivities(Ishigami(), target, (points(4),))
    for word in words:
        assert word in str(raised.value)


def test_integer_inputs_and_inputs_without_samples_are_refused():
    class Takes(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(()))

        def forward(self, x: Tensor, n: Tensor) -> Tensor:
            return self.w * x * n

    with pytest.raises(TypeError, match="torch.int64.*floating-point inputs"):
        per_sample_sensitivities(Takes(), "args[1]", (torch.ones(3), torch.ones(3, dtype=torch.long)))
    with pytest.raises(ValueError, match="0-dim tensor.*first dimension that indexes samples"):
        per_sample_sensitivities(Takes(), "args[1]", (torch.ones(3), torch.tensor(2.0)))


@pytest.mark.parametrize("delta", [0.01, 0.001])
def test_the_exact_dgsm_agrees_with_salibs_finite_differences_within_their_error(delta):
    """SALib's DGSM (forward differences, step ``delta`` × range) on the same base points: its error is O(delta),
    so it closes in on the exact value tenfold as ``delta`` shrinks tenfold."""
    finite_diff = pytest.importorskip("SALib.sample.finite_diff")
    dgsm = pytest.importorskip("SALib.analyze.dgsm")
    problem = {"num_vars": 3, "names": ["x1", "x2", "x3"], "bounds": [[-math.pi, math.pi]] * 3}
    x = finite_diff.sample(problem, 512, delta=delta, seed=0)
    model = Ishigami()
    with torch.no_grad():
        y = model(torch.tensor(x)).numpy()
    salib = dgsm.analyze(problem, x, y, seed=0)["vi"]
    base = torch.tensor(x[::4])
    sens = per_sample_sensitivities(model, "args[0][:, ...]", (base,))
    for j, partial in enumerate(ishigami_partials(base)):
        exact = float((sens[f"args[0][:, {j}]"] ** 2).mean())
        assert exact == pytest.approx(float((partial**2).mean()), rel=1e-12)
        assert salib[j] == pytest.approx(exact, rel=5 * delta)  # the forward differences' error, O(delta)
