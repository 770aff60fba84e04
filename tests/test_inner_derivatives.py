"""Models that take a derivative inside ``forward``: ML potentials whose forces are ``-autograd.grad(E, R)``, with
``create_graph=self.training`` as schnetpack and nequip write it. They need grad while they run, and every
evaluation of the engine (shape reads, the choice of mode, probes, finite differences) gives it to them."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import central_differences
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sensitivity import SensitivityMonitor, per_sample_sensitivities


class Potential(nn.Module):
    """Per-atom energies from positions ``R [B, atoms, 3]``; returns the forces ``-dE/dR`` flattened, ``[B, 3 atoms]``.
    ``unused`` reaches nothing, and ``net.2.bias`` shifts the energy only, so the forces do not depend on it."""

    def __init__(self, activation: type[nn.Module] = nn.SiLU) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 8), activation(), nn.Linear(8, 1))
        self.unused = nn.Parameter(torch.tensor([0.5]))

    def forward(self, positions: Tensor) -> Tensor:
        if not positions.requires_grad:
            positions = positions.requires_grad_()
        energy = self.net(positions).sum((1, 2))
        (gradient,) = torch.autograd.grad(energy.sum(), positions, create_graph=self.training)
        return -gradient.flatten(1)


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


class ForceModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.potential = Potential()

    def forward(self, positions: Tensor) -> Tensor:
        return self.potential(positions)

    def training_step(self, batch, batch_idx):
        positions, forces = batch
        return (self(positions) - forces).square().mean()

    def validation_step(self, batch, batch_idx):
        torch.set_grad_enabled(True)  # schnetpack's AtomisticTask does this for models with derivatives
        positions, forces = batch
        self.log("val_loss", (self(positions) - forces).square().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("fn", ["fit", "validate"])
def test_the_monitor_on_a_force_model(tmp_path, fn):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(12, 4, 3, generator=g), torch.randn(12, 12, generator=g))
    torch.manual_seed(0)
    model = ForceModule()
    targets = ["potential.net.0.weight[0, 1]", "potential.net.2.bias[0]", "potential.unused[0]"]
    monitor = SensitivityMonitor(targets, log_histograms=False, log_figures=False)
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        inference_mode=False,  # a model that differentiates inside forward needs grad in validation
        callbacks=[monitor],
        default_root_dir=tmp_path,
    )
    loader = DataLoader(data, batch_size=6)
    if fn == "fit":
        trainer.fit(model, loader, loader)
    else:
        trainer.validate(model, loader)
    positions = data.tensors[0].double()
    summary = monitor.summary()
    trained = model.double().eval()
    for label in targets:
        expected = central_differences(trained, label, positions)
        assert summary[label]["count"] == expected.numel()
        assert summary[label]["mean"] == pytest.approx(float(expected.mean()), rel=1e-4, abs=1e-7)
        assert summary[label]["abs_mean"] == pytest.approx(float(expected.abs().mean()), rel=1e-4, abs=1e-7)
    assert summary["potential.net.2.bias[0]"]["abs_mean"] == 0.0
