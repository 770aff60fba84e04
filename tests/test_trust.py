"""Never a silent wrong number: the finite-difference check, lost tangents, and the real-model cases that used
to give zeros (adjoint ODE solvers, torch.compile, BatchNorm running statistics, tied weights, lazy modules)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import Recurrent, loop_reference
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lightning_sensitivity import DEFAULT_PLANS, SensitivityCheckError, per_sample_sensitivities

GRAD_MODES = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


def quiet(model, targets, args, **kwargs):
    """per_sample_sensitivities with every UserWarning an error: no fallback, no surprise."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        return per_sample_sensitivities(model, targets, args, **kwargs)


# ---- the check must not fire on ordinary models ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_check_passes_on_the_zoo(zoo_case, dtype):
    name, model, args, targets, labels = zoo_case
    model = model.to(dtype)
    args = tuple(a.to(dtype) if a.is_floating_point() else a for a in args)
    with torch.inference_mode():
        sens = quiet(model, targets, args, verify=True)
    assert list(sens) == labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["f32", "bf16", "f64"])
def test_check_passes_on_small_relu_nets_at_batch_4(dtype):
    """ReLU kinks inside [θ - h, θ + h] spoil one side of the difference, never both."""
    torch.manual_seed(0)
    for trial in range(60):
        net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).to(dtype)
        targets = [f"0.weight[{trial % 8}, {trial % 3}]", f"2.bias[{trial % 8}]", f"4.weight[1, {trial % 8}]"]
        quiet(net, targets, (torch.randn(4, 3, dtype=dtype),), verify=True)


class Decay(nn.Module):
    """``y = exp(-θ x) x + θ² x``: smooth, with ``dy/dθ = -x² exp(-θ x) + 2 θ x``."""

    def __init__(self, theta: float):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(theta))

    def forward(self, x: Tensor) -> Tensor:
        return torch.exp(-self.theta * x) * x + self.theta**2 * x


@pytest.mark.parametrize("theta", [1e-6, 1e4, -1e4, 0.0, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["f32", "bf16", "f64"])
def test_check_passes_for_every_scale_of_theta(theta, dtype):
    torch.manual_seed(1)
    x = (torch.rand(16, 3) * 1e-4).to(dtype)  # keeps exp(-θ x) finite for |θ| = 1e4
    sens = quiet(Decay(theta).to(dtype), "theta", (x,), verify=True)
    expected = -(x.double() ** 2) * torch.exp(-theta * x.double()) + 2 * theta * x.double()
    torch.testing.assert_close(sens["theta"].double(), expected, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=0)


class Magnitudes(nn.Module):
    """Thirteen outputs from 1e-6 to 1e6 times ``tanh(a x)``."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.7))
        self.register_buffer("scales", torch.logspace(-6, 6, 13))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.a * x) * self.scales


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["f32", "bf16", "f64"])
def test_check_passes_on_outputs_spanning_twelve_orders_of_magnitude(dtype):
    quiet(Magnitudes().to(dtype), "a", (torch.randn(8, 1, dtype=dtype),), verify=True)


def test_check_passes_with_dropout_left_on_and_sees_the_same_masks():
    torch.manual_seed(2)
    for _ in range(10):
        net = nn.Sequential(nn.Linear(3, 16), nn.Dropout(0.5), nn.Tanh(), nn.Linear(16, 2)).train()
        x = torch.randn(4, 3)
        state = torch.get_rng_state()
        with torch.no_grad():
            sens = quiet(net, ["0.weight[1, 1]", "3.weight[0, 3]", "3.bias[1]"], (x,), verify=True)
        # every target saw the masks of one evaluation: the bias's derivative is 1 whatever the mask
        assert torch.equal(sens["3.bias[1]"], torch.tensor([[0.0, 1.0]]).expand(4, 2))
        torch.set_rng_state(state)
        one = quiet(net, ["3.weight[0, 3]"], (x,), verify=True)
        torch.testing.assert_close(one["3.weight[0, 3]"], sens["3.weight[0, 3]"])


def test_check_passes_for_a_target_the_output_does_not_depend_on():
    net = nn.Linear(3, 2)
    net.register_buffer("unused", torch.tensor(1.0))
    for method in ("auto", "forward", "reverse"):
        sens = quiet(net, ["unused", "weight[0, 1]"], (torch.randn(4, 3),), verify=True, method=method)
        assert torch.equal(sens["unused"], torch.zeros(4, 2))
        sens = quiet(net, "unused", (torch.randn(4, 3),), verify=True, method=method)
        assert torch.equal(sens["unused"], torch.zeros(4, 2))


def test_check_never_changes_the_module_or_the_inputs_or_the_random_stream():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.3), nn.Linear(4, 2)).train()
    x = torch.randn(5, 3)
    x_before, state_before = x.clone(), copy.deepcopy(model.state_dict())
    torch.manual_seed(4)
    per_sample_sensitivities(model, ["0.weight[1, 2]", "3.bias[0]"], (x,), verify=True)
    after_check = torch.rand(3)
    torch.manual_seed(4)
    per_sample_sensitivities(model, ["0.weight[1, 2]", "3.bias[0]"], (x,))
    assert torch.equal(torch.rand(3), after_check)  # the check consumed no random numbers of its own
    assert torch.equal(x, x_before)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state_before[key]), key


# ---- the check must fire where AD is wrong ----------------------------------------------------------------


class WrongSign(torch.autograd.Function):
    """``sin`` with a jvp of the wrong sign (and a right backward)."""

    @staticmethod
    def forward(x):
        return x.sin()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_forward(inputs[0])
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def jvp(ctx, tangent):
        (x,) = ctx.saved_tensors
        return -tangent * x.cos()

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * x.cos()


class ScaleBy(torch.autograd.Function):
    """``x * k`` for a ``k`` it is handed detached, as code that captures a parameter does: right for ``x``,
    blind to ``k``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, k):
        return x * k

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_forward(inputs[1])
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def jvp(ctx, x_tangent, _):
        (k,) = ctx.saved_tensors
        return x_tangent * k

    @staticmethod
    def backward(ctx, grad):
        (k,) = ctx.saved_tensors
        return grad * k, None


class WithWrongSign(nn.Module):
    def __init__(self):
        super().__init__()
        self.k = nn.Parameter(torch.tensor(0.8))
        self.j = nn.Parameter(torch.tensor(0.3))

    def forward(self, x: Tensor) -> Tensor:
        return WrongSign.apply(self.k * x) + self.j * x


class Captures(nn.Module):
    def __init__(self):
        super().__init__()
        self.k = nn.Parameter(torch.tensor(2.0))
        self.lin = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return ScaleBy.apply(self.lin(x), self.k.detach())


@pytest.mark.parametrize("targets", [["k"], ["k", "j"]], ids=["dual-numbers", "vmap"])
def test_check_fires_on_a_jvp_with_the_wrong_sign(targets):
    with pytest.raises(SensitivityCheckError) as info:
        per_sample_sensitivities(WithWrongSign(), targets, (torch.randn(4, 2),), verify=True)
    message = str(info.value)
    assert "'k'" in message and "|AD| =" in message and "|finite differences| =" in message
    assert "autograd.Function" in message and "verify=False" in message
    assert [m.label for m in info.value.mismatches] == ["k"]
    mismatch = info.value.mismatches[0]
    assert mismatch.ad_norm == pytest.approx(mismatch.fd_norm, rel=0.05)  # same size, opposite sign
    assert isinstance(info.value, RuntimeError)
    per_sample_sensitivities(WithWrongSign(), targets, (torch.randn(4, 2),))  # no check, no error


@pytest.mark.filterwarnings("ignore:.*falling back|.*Falling back:UserWarning")
@pytest.mark.parametrize("verify", [False, True])
def test_check_fires_on_a_function_that_captures_the_parameter(verify):
    """With the Linear's weight as a second target the output has a tangent, so k's zero is materialised: the
    all-zero derivative is confirmed by finite differences, check or no check, in either AD mode."""
    torch.manual_seed(5)
    with pytest.raises(SensitivityCheckError, match="'k'.*either AD mode") as info:
        per_sample_sensitivities(Captures(), ["k", "lin.weight[0, 1]"], (torch.randn(4, 3),), verify=verify)
    assert "lin.weight" not in str(info.value)


class Bessel(nn.Module):
    def __init__(self):
        super().__init__()
        self.k = nn.Parameter(torch.tensor(1.3))

    def forward(self, x: Tensor) -> Tensor:
        return torch.special.bessel_j0(self.k * x)


class Reentrant(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.k = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: Tensor) -> Tensor:
        return checkpoint(lambda z: torch.tanh(self.k * self.lin(z)), x, use_reentrant=True)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("verify", [False, True])
@pytest.mark.parametrize(
    ("model", "targets"),
    [(Bessel, ["k"]), (Reentrant, ["k"]), (Reentrant, ["k", "lin.weight[0, 1]"]), (Captures, ["k"])],
    ids=["bessel", "reentrant-checkpoint", "reentrant-checkpoint-vmap", "captured-parameter"],
)
def test_a_lost_derivative_is_an_error_not_a_zero(model, targets, verify):
    """No tangent reaches the output, but the output moves with the target: never report zero."""
    torch.manual_seed(6)
    with pytest.raises(SensitivityCheckError, match="'k' \\(central differences of norm") as info:
        per_sample_sensitivities(model(), targets, (torch.rand(5, 3) + 0.5,), verify=verify)
    assert "it would have been reported as zero" in str(info.value)


class ReadsPrimal(nn.Module):
    """Reads the plain value of ``k``, as a C++ extension reading its data would: forward-mode tangents are
    dropped there, reverse mode is unaffected."""

    def __init__(self):
        super().__init__()
        self.k = nn.Parameter(torch.tensor(1.5))

    def forward(self, x: Tensor) -> Tensor:
        return torch.autograd.forward_ad.unpack_dual(self.k).primal * x


def test_a_tangent_lost_in_forward_mode_falls_back_to_reverse_mode():
    x = torch.randn(6, 2)
    with pytest.warns(UserWarning, match="'k'.*Falling back to batched reverse mode"):
        sens = per_sample_sensitivities(ReadsPrimal(), "k", (x,))
    torch.testing.assert_close(sens["k"], x)
    with pytest.raises(SensitivityCheckError, match="forward-mode AD"):
        per_sample_sensitivities(ReadsPrimal(), "k", (x,), method="forward")


class Hamiltonian(nn.Module):
    """The output is a gradient, ``dH/dx`` of ``H = k x² + j x``, taken inside forward (forward over reverse)."""

    def __init__(self):
        super().__init__()
        self.k = nn.Parameter(torch.tensor(1.5))
        self.j = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: Tensor) -> Tensor:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            energy = (self.k * x**2 + self.j * x).sum()
            return torch.autograd.grad(energy, x, create_graph=True)[0]


@pytest.mark.parametrize("targets", [["k"], ["k", "j"]], ids=["dual-numbers", "one-at-a-time"])
def test_gradient_inside_forward_stays_in_forward_mode(targets):
    """torch.func refuses requires_grad_ inside the model; dual numbers do not."""
    x = torch.randn(4, 2)
    sens = quiet(Hamiltonian(), targets, (x,), verify=True)
    torch.testing.assert_close(sens["k"], 2 * x)
    if len(targets) > 1:
        torch.testing.assert_close(sens["j"], torch.ones_like(x))


def test_independence_is_confirmed_once_per_module():
    net = nn.Linear(3, 2)
    net.register_buffer("unused", torch.tensor(1.0))
    per_sample_sensitivities(net, "unused", (torch.randn(4, 3),))
    assert DEFAULT_PLANS[net].independent == {"unused"}


# ---- adjoint ODE solvers: parameters filtered by requires_grad, a backward that re-runs the module -------------


class Dynamics(nn.Module):
    def __init__(self):
        super().__init__()
        self.k = nn.Parameter(torch.tensor(2.0))
        self.lin = nn.Linear(2, 2)

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        return -self.k * y + 0.1 * torch.tanh(self.lin(y))


class AdjointODE(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = Dynamics()

    def forward(self, y0: Tensor) -> Tensor:
        from torchdiffeq import odeint_adjoint

        t = torch.linspace(0, 1, 5, dtype=y0.dtype)
        options = {"step_size": 0.1}
        return odeint_adjoint(self.f, y0, t, method="rk4", options=options).permute(1, 0, 2)  # [B, T, 2]


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


# ---- torch.compile: compiled code is differentiated eagerly ------------------------------------------------


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


# ---- BatchNorm running statistics ---------------------------------------------------------------------------


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


# ---- crashes and unhelpful errors ---------------------------------------------------------------------------


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


def test_lazy_module_target_is_a_clear_error_until_materialised():
    torch.manual_seed(13)
    net = nn.Sequential(nn.LazyLinear(2), nn.Tanh())
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="'0.weight\\[1, 2\\]'.*uninitialized.*lazy module.*run the module once"):
        per_sample_sensitivities(net, "0.weight[1, 2]", (x,))
    net(x)
    sens = per_sample_sensitivities(net, "0.weight[1, 2]", (x,))
    torch.testing.assert_close(sens["0.weight[1, 2]"], loop_reference(net, ["0.weight[1, 2]"], (x,))["0.weight[1, 2]"])


class TiedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 5)
        self.head = nn.Linear(5, 7, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.embed(tokens)))


@pytest.mark.parametrize("count", [1, 2], ids=["dual-numbers", "vmap"])
def test_tied_weight_by_either_name(count):
    torch.manual_seed(14)
    model = TiedHead().double()
    tokens = torch.randint(0, 7, (4, 3))
    for label in ("head.weight[2, 3]", "embed.weight[2, 3]"):
        sens = per_sample_sensitivities(
            model, [label, "embed.weight[0, 0]"][:count] if "head" in label else label, (tokens,)
        )
        assert list(sens)[0] == label
        torch.testing.assert_close(sens[label], loop_reference(model, [label], (tokens,))[label], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="one tied tensor"):
        per_sample_sensitivities(model, ["head.weight[2, 3]", "embed.weight[2, 3]"], (tokens,))


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


def test_fallback_warning_names_the_function_and_the_line():
    class NoJvp(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x.sin()

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])

        @staticmethod
        def backward(ctx, grad):
            return grad * ctx.saved_tensors[0].cos()

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return NoJvp.apply(self.lin(x))

    with pytest.warns(UserWarning, match="falling back") as record:
        per_sample_sensitivities(Model(), "lin.weight[0, 0]", (torch.randn(2, 3),))
    message = str(next(w.message for w in record if "falling back" in str(w.message)))
    assert "NoJvp" in message and "NoJvp.apply(self.lin(x))" in message and "test_trust.py" in message


class RecordsFlags(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = Recurrent("LSTM")
        self.seen: list[tuple[bool, bool]] = []

    def forward(self, x: Tensor) -> Tensor:
        self.seen.append((torch.backends.cudnn.enabled, torch.backends.mkldnn.enabled))
        return self.rnn(x)


def test_rnn_kernels_without_forward_formulas_are_steered_around_and_flags_restored():
    """oneDNN on CPU and cuDNN on CUDA have no forward-mode formula for LSTM/GRU: both are off during the
    differentiation of a model that holds an RNN, and back on after."""
    torch.manual_seed(16)
    model = RecordsFlags().eval()
    x = torch.randn(2, 4, 3)
    flags = torch.backends.cudnn.enabled, torch.backends.mkldnn.enabled
    cudnn_benchmark = torch.backends.cudnn.benchmark
    with torch.inference_mode():
        sens = per_sample_sensitivities(model, "rnn.rnn.weight_hh_l0[5, 1]", (x,))
        model.seen.clear()
        per_sample_sensitivities(model, "rnn.rnn.weight_hh_l0[5, 1]", (x,))
    assert model.seen == [(False, False)]
    assert (torch.backends.cudnn.enabled, torch.backends.mkldnn.enabled) == flags
    assert torch.backends.cudnn.benchmark == cudnn_benchmark
    expected = loop_reference(model.rnn, ["rnn.weight_hh_l0[5, 1]"], (x,))["rnn.weight_hh_l0[5, 1]"]
    torch.testing.assert_close(sens["rnn.rnn.weight_hh_l0[5, 1]"], expected, rtol=1e-4, atol=1e-6)


class LostAmongOthers(nn.Module):
    """``y = x * k`` through ``.item()`` (no tangent, no gradient), plus ``c * x``, which AD carries."""

    def __init__(self):
        super().__init__()
        self.k = nn.Parameter(torch.tensor(1.3))
        self.c = nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        return x * self.k.item() + self.c * x


@pytest.mark.parametrize("method", ["forward", "auto", "reverse"])
def test_a_lost_derivative_among_several_targets_is_not_reported_as_zeros(method):
    """With ``c`` reaching the output, ``k``'s lost derivative comes out of a chunk of targets (or of reverse
    mode) as zeros that no mode marks missing: the first call confirms every all-zero derivative."""
    x = torch.linspace(0.5, 2.0, 4)
    with pytest.raises(SensitivityCheckError, match="'k'"):
        per_sample_sensitivities(LostAmongOthers(), ["k", "c"], (x,), method=method)
    with pytest.raises(SensitivityCheckError, match="'k'"):
        per_sample_sensitivities(LostAmongOthers(), "k", (x,), method=method)


def test_a_target_is_remembered_independent_only_if_its_value_never_reaches_the_output():
    """At ``x = 0`` the output is flat along ``k`` (``x * k.item()``): zeros are right there, but ``k`` is not
    independent of the output, so the next batch is checked again. A parameter the output never reads is
    confirmed once."""
    model = LostAmongOthers()
    sens = per_sample_sensitivities(model, ["k", "c"], (torch.zeros(3),))
    assert not sens["k"].any()
    with pytest.raises(SensitivityCheckError, match="'k'"):
        per_sample_sensitivities(model, ["k", "c"], (torch.arange(1.0, 4.0),))

    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.k = nn.Parameter(torch.tensor(2.0))
            self.spare = nn.Parameter(torch.tensor(3.0))

        def forward(self, x):
            return self.k * x

    model, calls = Unused(), []
    from lightning_sensitivity import _verify

    original = _verify.FiniteDifferences.depends
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_verify.FiniteDifferences, "depends", lambda *a: calls.append(1) or original(*a))
        for _ in range(3):
            assert not per_sample_sensitivities(model, "spare", (torch.randn(4),))["spare"].any()
    assert len(calls) == 1


def test_per_sample_reverse_mode_is_checked_again_for_each_batch_layout():
    """Which inputs are batched is read from their first dimension, and whether the model mixes samples from
    its mode: a later batch of as many samples as an unbatched input has elements, or the model in train mode,
    is checked again rather than taken on trust from an earlier call."""

    class Weighted(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 4))

        def forward(self, x, w):  # w [4]: the same feature weights for every sample
            return (self.net(x) * w).sum(-1)

    class Centred(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))

        def forward(self, x):
            y = self.net(x)[:, 0]
            return y - y.mean(0) if self.training else y  # mixes samples in training only

    torch.manual_seed(0)
    targets = [f"net.0.weight[{i}, {j}]" for i in range(8) for j in range(4)]
    w = torch.randn(4)
    for method in ("reverse", "auto"):
        model = Weighted().eval()
        per_sample_sensitivities(model, targets, (torch.randn(16, 4), w), method=method)
        x = torch.randn(4, 4)  # 4 samples, as many as w has elements
        sens = per_sample_sensitivities(model, targets[:2], (x, w), method=method)
        expected = loop_reference(model, targets[:2], (x, w))
        for label in targets[:2]:
            torch.testing.assert_close(sens[label], expected[label], rtol=1e-4, atol=1e-6)
    model, x = Centred().eval(), torch.randn(16, 4)
    per_sample_sensitivities(model, targets, (x,), method="reverse")
    model.train()
    sens = per_sample_sensitivities(model, targets, (x,), method="reverse")
    torch.testing.assert_close(sens[targets[0]], loop_reference(model, targets[:1], (x,))[targets[0]])


@pytest.mark.parametrize("method", ["forward", "auto", "reverse"])
def test_under_autocast_the_derivative_of_the_autocast_computation(method):
    """Under ``torch.autocast`` (bf16 on CPU) the rerouted products and normalisations give way to torch's own
    formulas, which autocast casts, and one target goes through ``jvp`` (autocast casts a dual number's primal
    but not its tangent): the derivative of what the model computes under autocast, as the loop of
    ``torch.autograd.grad`` under autocast gives it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.LayerNorm(8), nn.Linear(8, 2))
    x = torch.randn(5, 4)
    labels = ["0.weight[1, 2]", "2.weight[3]", "3.bias[1]"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = loop_reference(model, labels, (x,))
        several = per_sample_sensitivities(model, labels, (x,), method=method)
        one = per_sample_sensitivities(model, labels[0], (x,), method=method)
    for label in labels:
        torch.testing.assert_close(several[label].float(), expected[label].float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(one[labels[0]].float(), expected[labels[0]].float(), rtol=2e-2, atol=2e-2)


class Rounded(nn.Module):
    """``y = round(c x) w``: dy/dc is 0 almost everywhere, and finite differences step across the jumps."""

    def __init__(self):
        super().__init__()
        self.c = nn.Parameter(torch.tensor(3.3))
        self.w = nn.Parameter(torch.tensor(0.7))

    def forward(self, x):
        return torch.round(x * self.c) * self.w


class Policy(nn.Module):
    """The log-probability of an action under ``Categorical(logits=mlp(obs))``, with hidden unit 0 dead on the
    data; the distribution refuses NaN logits."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        with torch.no_grad():
            self.net[0].bias[0] = -100.0

    def forward(self, obs, act):
        return torch.distributions.Categorical(logits=self.net(obs)).log_prob(act).unsqueeze(1)


@pytest.mark.parametrize("method", ["forward", "auto", "reverse"])
def test_zeros_that_ad_carries_are_taken_as_they_are(method):
    """An all-zero derivative that forward mode on the target alone carries as a zero (a rounding step, a ReLU
    kink, a dead unit) is no lost derivative: no finite differences, which would step across the jump or the
    kink, and no NaN probe, which a model may refuse; it is not checked again at later calls."""
    torch.manual_seed(0)
    x = torch.randn(32, 1) * 5
    assert not quiet(Rounded(), ["c", "w"], (x,), method=method)["c"].any()
    kinked = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    nn.init.zeros_(kinked[0].bias)  # with zero inputs every unit sits on its kink, where relu' is 0
    assert not quiet(kinked, ["0.bias[0]", "2.bias[0]"], (torch.zeros(4, 3),), method=method)["0.bias[0]"].any()
    policy, obs, act = Policy(), torch.randn(6, 4), torch.randint(0, 3, (6,))
    labels = ["net.0.weight[0, 0]", "net.0.weight[1, 0]"]
    from lightning_sensitivity import _verify

    calls = []
    original = _verify.FiniteDifferences.evaluate
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_verify.FiniteDifferences, "evaluate", lambda *a: calls.append(1) or original(*a))
        for _ in range(3):
            sens = quiet(policy, labels, (obs, act), method=method)
    assert not sens[labels[0]].any() and calls == []
    torch.testing.assert_close(sens[labels[1]], loop_reference(policy, labels[1:], (obs, act))[labels[1]])


# ---- found by a third probe: references past the module, caches, gradients that are not derivatives --------------


class ThroughAReference(nn.Module):
    """Reads its weight through references of its own, made in ``__init__``: what the engine swaps (the module's
    attribute) never reaches the output, so AD, finite differences and the NaN probe through the attribute all
    see a constant."""

    def __init__(self, holder: str) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        if holder == "partial":
            import functools

            self.project = functools.partial(nn.functional.linear, weight=self.lin.weight)
        else:
            weights = [self.lin.weight]
            self.project = lambda x: x @ weights[0].T

    def forward(self, x: Tensor) -> Tensor:
        return self.project(x)


@pytest.mark.parametrize("holder", ["partial", "list"])
@pytest.mark.parametrize("method", ["auto", "forward", "reverse"])
def test_a_parameter_read_through_a_reference_of_its_own_is_an_error_not_a_zero(holder, method):
    model, x = ThroughAReference(holder), torch.randn(5, 3)
    before = model.lin.weight.detach().clone()
    with pytest.raises(SensitivityCheckError, match="'lin.weight\\[1, 2\\]' through a reference of its own"):
        per_sample_sensitivities(model, "lin.weight[1, 2]", (x,), method=method)
    assert torch.equal(model.lin.weight, before)  # the probe put the value back, bit for bit


class Symmetric(nn.Module):
    def forward(self, weight: Tensor) -> Tensor:
        return weight.triu() + weight.triu(1).T


def _parametrized(kind: str) -> tuple[nn.Module, str]:
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    if kind == "custom":
        model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
        parametrize.register_parametrization(model[0], "weight", Symmetric())
        return model, "0.parametrizations.weight.original[0, 2]"
    return nn.Sequential(
        weight_norm(nn.Linear(4, 4)), nn.Tanh(), nn.Linear(4, 2)
    ), "0.parametrizations.weight.original1[0, 2]"


@pytest.mark.parametrize("kind", ["custom", "weight_norm"])
@pytest.mark.parametrize("method", ["auto", "reverse"])
def test_parametrized_weights_inside_parametrize_cached(kind, method):
    from torch.nn.utils import parametrize

    model, label = _parametrized(kind)
    x = torch.randn(5, 4)
    expected = loop_reference(model, [label], (x,))[label]
    with warnings.catch_warnings(), parametrize.cached():
        warnings.simplefilter("ignore", UserWarning)  # weight_norm has no forward-mode formula: reverse mode
        model(x)  # the model's own call fills the cache first, as it would in a validation step
        sens = per_sample_sensitivities(model, label, (x,), method=method, verify=True)
        assert parametrize._cache  # the caller's cache is left as it was
    torch.testing.assert_close(sens[label], expected)


class Bag(nn.Module):
    def __init__(self, bag: bool, **kwargs) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.bag = bag
        self.emb = (nn.EmbeddingBag if bag else nn.Embedding)(6, 3, **kwargs)

    def forward(self, idx: Tensor) -> Tensor:
        return self.emb(idx) if self.bag else self.emb(idx).sum(1)


def test_an_embedding_with_scale_grad_by_freq_is_never_differentiated_in_reverse_mode():
    """Its backward divides a row's gradient by how often the index occurs: not dy/dθ."""
    idx = torch.tensor([[2, 2, 1], [2, 0, 0], [3, 4, 5], [2, 2, 2]])
    expected = (idx == 2).sum(1, keepdim=True).float() * torch.tensor([[0.0, 1.0, 0.0]])  # d sum_j w[idx_j] / d w[2, 1]
    model = Bag(bag=False, scale_grad_by_freq=True)
    torch.testing.assert_close(
        per_sample_sensitivities(model, "emb.weight[2, 1]", (idx,))["emb.weight[2, 1]"], expected
    )
    with pytest.raises(ValueError, match="scale_grad_by_freq=True.*method='auto' or 'forward'"):
        per_sample_sensitivities(model, "emb.weight[2, 1]", (idx,), method="reverse")
    bag = Bag(bag=True, scale_grad_by_freq=True)
    with (
        pytest.raises(ValueError, match="EmbeddingBag 'emb', made with scale_grad_by_freq=True"),
        pytest.warns(UserWarning, match="forward-mode AD is not available"),  # embedding_bag has no formula
    ):
        per_sample_sensitivities(bag, "emb.weight[2, 1]", (idx,))


@pytest.mark.parametrize(("bag", "method"), [(False, "reverse"), (True, "auto")])
def test_sparse_embedding_gradients_in_reverse_mode(bag, method):
    idx = torch.tensor([[2, 2, 1], [2, 0, 0], [3, 4, 5], [2, 2, 2]])
    model = Bag(bag=bag, sparse=True)
    labels = ["emb.weight[2, 1]", "emb.weight[0, 0]"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        sens = per_sample_sensitivities(model, labels, (idx,), method=method)
    dense = Bag(bag=bag)
    dense.load_state_dict(model.state_dict())
    expected = loop_reference(dense, labels, (idx,))
    for label in labels:
        torch.testing.assert_close(sens[label], expected[label])


class PackedGRU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.gru = nn.GRU(3, 4, batch_first=True)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, h = self.gru(packed)
        return h[0]


@pytest.mark.parametrize("method", ["auto", "forward"])
def test_a_packed_sequence_through_an_rnn_with_several_targets(method):
    """vmap cannot run the RNN kernel on a packed sequence: one tangent at a time instead."""
    model, x, lengths = PackedGRU(), torch.randn(5, 6, 3), torch.tensor([6, 2, 4, 1, 5])
    labels = ["gru.weight_ih_l0[0, 1]", "gru.weight_hh_l0[3, 2]", "gru.bias_hh_l0[5]"]
    sens = per_sample_sensitivities(model, labels, (x, lengths), method=method)
    expected = loop_reference(model, labels, (x, lengths))
    for label in labels:
        torch.testing.assert_close(sens[label], expected[label])


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


class MaskedAttentionRow(nn.Module):
    """Softmax of scores ``w * x``, sample 0's row filled with ``finfo.min`` as eager attention masks a left-padded
    position: in float32 that row does not move with ``w`` at all, while the formula's derivative is not zero."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.7))

    def forward(self, x: Tensor) -> Tensor:
        mask = torch.zeros_like(x)
        mask[0] = torch.finfo(x.dtype).min
        return torch.softmax(self.w * x + mask, dim=-1)


def test_a_disagreement_only_where_the_output_is_frozen_says_so():
    model, x = MaskedAttentionRow(), torch.randn(3, 4)
    torch.testing.assert_close(per_sample_sensitivities(model, "w", (x,))["w"], loop_reference(model, ["w"], (x,))["w"])
    with pytest.raises(SensitivityCheckError, match="did not move at all.*finfo\\(dtype\\).min") as raised:
        per_sample_sensitivities(model, "w", (x,), verify=True)
    (mismatch,) = raised.value.mismatches
    assert mismatch.frozen and mismatch.frozen_norm > 0
    with pytest.raises(SensitivityCheckError) as raised:  # a wrong jvp where the output moves: the usual causes
        per_sample_sensitivities(WithWrongSign(), "k", (torch.randn(4, 2),), verify=True)
    assert "Likely causes" in str(raised.value) and not raised.value.mismatches[0].frozen
