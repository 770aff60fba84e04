"""Third-party model code and compiled modules, exact against the loop of torch.autograd.grad: torchdiffeq's
adjoint solver (a backward that re-runs the module), torchode's adaptive solver, torch.compile (differentiated
eagerly, named without ``_orig_mod``) and GPT-2 from transformers with its tied output weight."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import Tensor, nn

from lightning_sensitivity import per_sample_sensitivities
from tests.helpers import GRAD_MODES, AdjointODE, loop_reference, quiet


@pytest.mark.parametrize("mode", sorted(GRAD_MODES))
@pytest.mark.parametrize("method", ["auto", "reverse"])
@pytest.mark.parametrize("targets", [["f.k"], ["f.k", "f.lin.weight[0, 1]"]], ids=["one", "two"])
def test_torchdiffeq_odeint_adjoint_is_exact(targets, method, mode):
    pytest.importorskip("torchdiffeq")
    torch.manual_seed(7)
    model = AdjointODE().double()
    y0 = torch.randn(3, 2, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as record, GRAD_MODES[mode]():
        warnings.simplefilter("always")
        sens = per_sample_sensitivities(model, targets, (y0,), method=method)
    expected = loop_reference(model, list(sens), (y0,))
    for label, value in expected.items():
        assert value.abs().sum() > 0
        torch.testing.assert_close(sens[label], value, rtol=1e-6, atol=1e-9)
    ours = [w for w in record if "per_sample_sensitivities" in str(w.message)]
    assert len(ours) == (1 if method == "auto" else 0)
    if ours:
        assert "OdeintAdjointMethod" in str(ours[0].message)


class TorchodeOscillator(nn.Module):
    def __init__(self):
        super().__init__()
        self.k = nn.Parameter(torch.tensor(1.5))
        self.c = nn.Parameter(torch.tensor(0.2))

    def forward(self, y0: Tensor) -> Tensor:
        import torchode

        def rhs(t, y):
            return torch.stack([y[:, 1], -self.k * y[:, 0] - self.c * y[:, 1]], 1)

        term = torchode.ODETerm(rhs)
        solver = torchode.AutoDiffAdjoint(
            torchode.Dopri5(term=term), torchode.IntegralController(atol=1e-9, rtol=1e-7, term=term)
        )
        t_eval = torch.linspace(0, 1, 5, dtype=y0.dtype).expand(y0.shape[0], 5)
        return solver.solve(torchode.InitialValueProblem(y0=y0, t_eval=t_eval)).ys[..., 0]


def test_torchode_adaptive_solver_matches_the_loop_and_passes_the_check():
    pytest.importorskip("torchode")
    torch.manual_seed(8)
    model = TorchodeOscillator().double()
    y0 = torch.randn(4, 2, dtype=torch.float64)
    with torch.inference_mode():
        sens = per_sample_sensitivities(model, ["k", "c"], (y0,), verify=True)
    for label, value in loop_reference(model, ["k", "c"], (y0,)).items():
        torch.testing.assert_close(sens[label], value, rtol=1e-5, atol=1e-7)


class CompiledInside(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.compile(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))
        self.k = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: Tensor) -> Tensor:
        return self.k * self.body(x)


@pytest.mark.parametrize("targets", [["body.0.weight[1, 2]"], ["body._orig_mod.0.weight[1, 2]", "k"]])
def test_compiled_submodule_is_exact_and_named_without_orig_mod(targets):
    torch.manual_seed(9)
    model = CompiledInside().eval()
    x = torch.randn(5, 3)
    eager = copy.deepcopy(model)
    eager.body = eager.body._orig_mod
    with torch.inference_mode():
        sens = quiet(model, targets, (x,), verify=True)  # in forward mode: no tangent lost, no fallback
    labels = ["body.0.weight[1, 2]", "k"][: len(targets)]
    assert list(sens) == labels
    for label, value in loop_reference(eager, labels, (x,)).items():
        assert value.abs().sum() > 0
        torch.testing.assert_close(sens[label], value, rtol=1e-5, atol=1e-7)


def test_compiled_module_is_exact():
    torch.manual_seed(10)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).eval()
    x = torch.randn(5, 3)
    sens = quiet(torch.compile(net), ["0.weight[1, 2]", "_orig_mod.2.bias[0]"], (x,))
    assert list(sens) == ["0.weight[1, 2]", "2.bias[0]"]
    for label, value in loop_reference(net, list(sens), (x,)).items():
        torch.testing.assert_close(sens[label], value, rtol=1e-5, atol=1e-7)


def test_gpt2_tied_output_weight_and_attention():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0
    )

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.gpt = transformers.GPT2LMHeadModel(config)

        def forward(self, ids: Tensor) -> Tensor:
            return self.gpt(ids).logits

    torch.manual_seed(15)
    model = LM().eval()
    ids = torch.randint(0, 40, (3, 5))
    labels = ["gpt.lm_head.weight[5, 3]", "gpt.transformer.h.0.ln_1.weight[2]"]
    with torch.inference_mode():
        both = per_sample_sensitivities(model, labels, (ids,), verify=True)
        one = per_sample_sensitivities(model, labels[0], (ids,), verify=True)
    expected = loop_reference(model, labels, (ids,))
    torch.testing.assert_close(one[labels[0]], expected[labels[0]], rtol=1e-4, atol=1e-6)
    for label in labels:
        torch.testing.assert_close(both[label], expected[label], rtol=1e-4, atol=1e-6)
