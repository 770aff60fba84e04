"""The modes: forward mode where torch has formulas, kernels without them steered around, and reverse mode where
forward mode cannot run (one warning, naming what refused), against the loop of torch.autograd.grad."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

from lightning_sensitivity import DEFAULT_PLANS, SensitivityCheckError, per_sample_sensitivities
from tests.helpers import (
    GRAD_MODES,
    ZOO,
    Attention,
    Encoder,
    Recurrent,
    assert_untouched,
    loop_reference,
    quiet,
    snapshot,
)


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
    assert "NoJvp" in message and "NoJvp.apply(self.lin(x))" in message and "test_modes.py" in message


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
