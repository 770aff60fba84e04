"""Per-sample reverse mode (``method='reverse'``): exact against the loop of ``torch.autograd.grad``, batched
reverse mode for models that mix samples, checked again for each batch layout, memory bounded by chunk_size."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_sensitivity import DEFAULT_PLANS, per_sample_sensitivities
from tests.helpers import GRAD_MODES, ZOO, Wide, loop_reference

SEPARABLE = ["mlp", "conv-bn-eval", "attention", "transformer", "oscillator", "glob", "seed"]


@pytest.mark.parametrize("mode", sorted(GRAD_MODES))
@pytest.mark.parametrize("name", SEPARABLE)
def test_reverse_method_is_per_sample_and_exact(name, mode):
    make_model, make_args, targets, labels = ZOO[name]
    torch.manual_seed(0)
    model = make_model().double().eval()
    args = tuple(a.double() if a.is_floating_point() else a for a in make_args())
    with GRAD_MODES[mode]():
        sens = per_sample_sensitivities(model, targets, args, method="reverse")
    assert DEFAULT_PLANS[model].per_sample, "per-sample reverse mode was refused"
    expected = loop_reference(model, labels, args)
    for label in labels:
        assert not sens[label].requires_grad
        torch.testing.assert_close(sens[label], expected[label], rtol=1e-9, atol=1e-12)


def test_models_that_mix_samples_fall_back_to_batched_reverse():
    """Batch norm in training mode: each sample's output depends on the others."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh()).double().train()
    x = torch.randn(6, 3, dtype=torch.float64)
    sens = per_sample_sensitivities(model, ["0.weight[1, 2]", "1.bias[0]"], (x,), method="reverse")
    assert DEFAULT_PLANS[model].per_sample is False
    expected = loop_reference(model, ["0.weight[1, 2]", "1.bias[0]"], (x,))
    for label, value in expected.items():
        torch.testing.assert_close(sens[label], value, rtol=1e-9, atol=1e-12)


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


def test_per_sample_reverse_memory_is_bounded_by_chunk_size():
    torch.manual_seed(4)
    model = Wide(3).double().eval()
    x = torch.randn(20, 16, dtype=torch.float64)
    targets = [f"net.2.weight[{i}, {i + 1}]" for i in range(6)]
    whole = per_sample_sensitivities(model, targets, (x,), method="reverse")
    chunked = per_sample_sensitivities(model, targets, (x,), method="reverse", chunk_size=3)
    for label in whole:
        torch.testing.assert_close(chunked[label], whole[label], rtol=0, atol=1e-14)
