"""``SensitivityMonitor(step=...)``: what to differentiate, given ``(pl_module, batch, batch_idx)``, for a module
the user did not write; it wins over ``sensitivity_step``, takes ``dataloader_idx`` where it asks for it, comes as a
callable or an import path, and lets two monitors on one model watch different outputs (energy and forces)."""

from __future__ import annotations

import copy
import pickle

import lightning as L
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sensitivity import SensitivityMonitor
from tests.helpers import Physics, expected_stats, loaders, trainer


def last_two_outputs(pl_module, batch, batch_idx):
    """A step for Physics: the last two of its three outputs."""
    return pl_module(batch[0])[:, 1:]


def step_reference(step, module: nn.Module, label: str, batches) -> Tensor:
    """d step(module, batch, 0) / d label, every output element of every batch, by one ``torch.autograd.grad`` per
    element on a copy of the module (``label``: ``name`` or ``name[i, j]``)."""
    name, _, rest = label.partition("[")
    index = tuple(int(i) for i in rest.rstrip("]").split(",")) if rest else ()
    clone = copy.deepcopy(module)
    tensor = dict([*clone.named_parameters(), *clone.named_buffers()])[name]
    values = []
    with torch.enable_grad():
        for batch in batches:
            out = step(clone, batch, 0).reshape(-1)
            for e in range(out.numel()):
                (g,) = torch.autograd.grad(out[e], tensor, retain_graph=True, allow_unused=True)
                values.append(torch.zeros(()) if g is None else g[index])
    return torch.stack(values).detach()


def assert_summary_matches(monitor: SensitivityMonitor, label: str, reference: Tensor) -> None:
    stats, expected = monitor.summary()[label], expected_stats(reference)
    assert stats["count"] == reference.numel()
    for key in ("mean", "abs_mean", "mean_square", "min", "max"):
        assert stats[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key


def test_step_function_gives_the_sensitivities_of_what_it_returns(tmp_path):
    torch.manual_seed(0)
    model, (train, val) = Physics(), loaders()
    monitor = SensitivityMonitor(["C", "net.2.weight[1, 3]"], step=last_two_outputs)
    trainer(tmp_path, monitor).fit(model, train, val)
    for label in monitor.labels:
        assert_summary_matches(monitor, label, step_reference(last_two_outputs, model, label, val))


class WithOwnStep(Physics):
    def sensitivity_step(self, batch, batch_idx):
        return self(batch[0])[:, :1]


def test_the_monitors_step_wins_over_sensitivity_step(tmp_path):
    torch.manual_seed(0)
    model, (_, val) = WithOwnStep(), loaders()
    mine, theirs = SensitivityMonitor("C", step=last_two_outputs, prefix="mine"), SensitivityMonitor("C")
    trainer(tmp_path, [mine, theirs]).validate(model, val, verbose=False)
    assert_summary_matches(mine, "C", step_reference(last_two_outputs, model, "C", val))
    assert_summary_matches(theirs, "C", step_reference(lambda m, b, i: m(b[0])[:, :1], model, "C", val))


class Atoms(L.LightningModule):
    """A small potential: energy ``[B]`` from positions ``[B, 4, 3]`` and forces ``-dE/dR`` ``[B, 12]`` by
    ``torch.autograd.grad`` (``create_graph=self.training``, as ML potentials do). ``net.2.bias`` shifts the energy
    only: the forces do not depend on it."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 8), nn.SiLU(), nn.Linear(8, 1))

    def energy(self, positions: Tensor) -> Tensor:
        return self.net(positions).sum((1, 2))

    def forces(self, positions: Tensor) -> Tensor:
        with torch.enable_grad():
            positions = positions if positions.requires_grad else positions.requires_grad_()
            (gradient,) = torch.autograd.grad(self.energy(positions).sum(), positions, create_graph=self.training)
        return -gradient.flatten(1)

    def forward(self, positions: Tensor) -> Tensor:
        return self.energy(positions)

    def training_step(self, batch, batch_idx):
        positions, energy = batch
        return (self(positions) - energy).square().mean()

    def validation_step(self, batch, batch_idx):
        positions, energy = batch
        self.log("val_loss", (self(positions) - energy).square().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def energy_of(pl_module, batch, batch_idx):
    return pl_module.energy(batch[0])


def forces_of(pl_module, batch, batch_idx):
    return pl_module.forces(batch[0])


def test_two_monitors_watch_energy_and_forces_of_one_model(tmp_path):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(12, 4, 3, generator=g), torch.randn(12, generator=g))
    val = DataLoader(data, batch_size=4)
    model = Atoms()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    targets = ["net.0.weight[2, 1]", "net.2.bias"]
    energy = SensitivityMonitor(targets, step=energy_of, prefix="energy")
    forces = SensitivityMonitor(targets, step=forces_of, prefix="forces")
    trainer(tmp_path, [energy, forces]).fit(model, DataLoader(data, batch_size=4), val)
    for label in targets:
        assert_summary_matches(energy, label, step_reference(energy_of, model, label, val))
        assert_summary_matches(forces, label, step_reference(forces_of, model, label, val))
    assert forces.summary()["net.2.bias"]["abs_mean"] == 0.0  # exactly: the forces do not depend on it
    assert energy.summary()["net.2.bias"]["mean"] == pytest.approx(4.0)  # four atoms, dE/db = 4
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())  # it trained


def test_a_step_that_takes_dataloader_idx_gets_it(tmp_path):
    seen = []

    def step(pl_module, batch, batch_idx, dataloader_idx):
        seen.append(dataloader_idx)
        return pl_module(batch[0]) * (dataloader_idx + 1)

    torch.manual_seed(0)
    model, (_, val) = Physics(), loaders(8)
    monitor = SensitivityMonitor("C", step=step, verify=False)
    trainer(tmp_path, monitor).validate(model, [val, val], verbose=False)
    assert set(seen) == {0, 1}
    x = next(iter(val))[0][:, :1].expand(-1, 3)
    assert_summary_matches(monitor, "C", torch.cat([x.reshape(-1), 2 * x.reshape(-1)]))


def test_an_import_path_is_imported_and_keeps_the_state_key_and_copies_stable(tmp_path):
    path = f"{__name__}.last_two_outputs"
    monitor = SensitivityMonitor("C", step=path)
    assert monitor.step is last_two_outputs
    assert path in monitor.state_key and "0x" not in monitor.state_key  # no address: checkpoints restore
    assert monitor.state_key == SensitivityMonitor("C", step=last_two_outputs).state_key
    assert monitor.state_key != SensitivityMonitor("C").state_key
    assert pickle.loads(pickle.dumps(monitor)).step is last_two_outputs  # ddp_spawn pickles callbacks
    torch.manual_seed(0)
    model, (_, val) = Physics(), loaders()
    trainer(tmp_path, copy.deepcopy(monitor)).validate(model, val, verbose=False)  # a copy runs ...
    assert_summary_matches(monitor, "C", step_reference(last_two_outputs, model, "C", val))  # ... the held one tells


@pytest.mark.parametrize(
    ("step", "match"),
    [
        (42, r"step=\.\.\.\): must be a callable step\(pl_module, batch, batch_idx\).*got int"),
        (lambda batch: batch, r"cannot be called as step\(pl_module, batch, batch_idx\)"),
        ("no_such_package.steps.energy", r"cannot import 'no_such_package.steps.energy' \(No module named"),
        ("energy", r"cannot import 'energy' \(not a dotted path\)"),
        (f"{__name__}.no_such_step", r"has no attribute 'no_such_step'"),
    ],
)
def test_bad_steps_are_refused_at_construction(step, match):
    with pytest.raises(ValueError, match=match):
        SensitivityMonitor("C", step=step)


def test_a_step_that_returns_no_tensor_is_named_in_the_error(tmp_path):
    def describe(pl_module, batch, batch_idx):
        return {"y": pl_module(batch[0])}

    model, (_, val) = Physics(), loaders()
    with pytest.raises(TypeError, match=r"Physics\.describe"):
        trainer(tmp_path, SensitivityMonitor("C", step=describe)).validate(model, val, verbose=False)


def test_an_input_target_with_a_step(tmp_path):
    """``batch[0][:, 1]`` is placed in the batch the step gets: d step(x)[i] / d x[i, 1], each sample's own."""
    torch.manual_seed(0)
    model, (_, val) = Physics(), loaders()
    monitor = SensitivityMonitor(["batch[0][:, 1]", "C"], step=last_two_outputs)
    trainer(tmp_path, monitor).validate(model, val, verbose=False)
    values = []
    for x, y in val:
        x = x.clone().requires_grad_()
        with torch.enable_grad():
            out = last_two_outputs(model, (x, y), 0)
            for i in range(out.shape[0]):
                for j in range(out.shape[1]):
                    (g,) = torch.autograd.grad(out[i, j], x, retain_graph=True)
                    assert g[torch.arange(len(x)) != i].abs().max() == 0  # rows do not mix
                    values.append(g[i, 1])
    assert_summary_matches(monitor, "batch[0][:, 1]", torch.stack(values).detach())
