"""Models that take a derivative inside ``forward``: ML potentials whose forces are ``-autograd.grad(E, R)`` (the
``Potential`` of ``tests.helpers``), exact in every mode against float64 central differences, and exact zeros
for a target the forces do not depend on."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_sensitivity import per_sample_sensitivities
from tests.helpers import Potential, central_differences

TARGETS = [["net.0.weight[0, 1]"], ["net.0.weight[0, 1]", "net.0.bias[3]"], ["net.0.weight[2, 0]", "unused[0]"]]


@pytest.mark.parametrize("targets", TARGETS, ids=["one", "two", "unused"])
@pytest.mark.parametrize("method", ["auto", "forward", "reverse"])
@pytest.mark.parametrize("activation", [nn.SiLU, nn.Mish, nn.Tanh])  # silu_backward, mish_backward: no formula
def test_forces_are_exact_in_every_mode(activation, method, targets):
    torch.manual_seed(0)
    model = Potential(activation).double().eval()
    positions = torch.randn(4, 5, 3, dtype=torch.float64)
    with torch.enable_grad():  # as the model needs, and as schnetpack's steps set it
        sens = per_sample_sensitivities(model, targets, (positions,), method=method, verify=True)
    for label in targets:
        torch.testing.assert_close(sens[label], central_differences(model, label, positions), rtol=1e-6, atol=1e-8)
    if "unused[0]" in sens:
        assert torch.equal(sens["unused[0]"], torch.zeros_like(sens["unused[0]"]))


def test_a_target_the_forces_do_not_depend_on_gives_zeros():
    """The energy's bias moves the energy, not the forces: an exact zero, not a false alarm from a probe that ran
    the model without grad."""
    torch.manual_seed(0)
    model = Potential().double().eval()
    positions = torch.randn(3, 4, 3, dtype=torch.float64)
    with torch.enable_grad():
        sens = per_sample_sensitivities(model, ["net.2.bias[0]", "unused[0]", "net.0.weight[0, 0]"], (positions,))
    assert torch.equal(sens["net.2.bias[0]"], torch.zeros(3, 12, dtype=torch.float64))
    assert torch.equal(sens["unused[0]"], torch.zeros(3, 12, dtype=torch.float64))
    assert sens["net.0.weight[0, 0]"].abs().sum() > 0
