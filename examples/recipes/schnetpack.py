"""schnetpack: the per-sample sensitivities of a PaiNN potential's energies and forces, trained with schnetpack's
``AtomisticTask`` and a Lightning ``Trainer`` on an ``AtomsDataModule`` of tiny synthetic molecules.

The model (``NeuralNetworkPotential``: PaiNN, ``Atomwise`` energy, ``Forces``) takes the batch dict and returns a
dict; its forces are ``-autograd.grad(E, R)`` inside ``forward``. Two monitors with their own ``step=`` and
``prefix`` watch the two outputs: the energy of each molecule ``[molecules]`` and its forces, reshaped per
molecule ``[molecules, atoms * 3]``. Targets: carbon's embedding (element 0), an element of the first interaction's
context network, and the bias of the energy readout (dE/db = the number of atoms; the forces do not depend on it:
exact zeros).

Checks: the monitors' numbers against the loop of ``torch.autograd.grad`` at the final weights, the model left
exactly as it was by a ``trainer.validate`` with the monitors, and a fit bit for bit as without them.

    python examples/recipes/schnetpack.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import typing
from pathlib import Path

HERE = Path(__file__).resolve().parent
# This script has the library's name: with its folder on sys.path, `import schnetpack` would import the script.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

# schnetpack 2.0.4 imports T_co from torch.utils.data.dataloader, which torch 2.13 no longer defines:
# ImportError: cannot import name 'T_co' from 'torch.utils.data.dataloader'. Define it before the import.
import torch.utils.data.dataloader as _dl  # noqa: E402

_dl.T_co = typing.TypeVar("T_co", covariant=True)

import ase  # noqa: E402
import numpy as np  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import schnetpack as spk  # noqa: E402
import schnetpack.properties as P  # noqa: E402
import schnetpack.transform as trn  # noqa: E402
import torch  # noqa: E402
import torchmetrics  # noqa: E402

sys.path.insert(0, str(HERE))
from reference import assert_untouched, check, loop_reference, snapshot  # noqa: E402

torch.set_num_threads(1)  # a model this small runs fastest on one thread (several contend on a busy CPU)
WORK = tempfile.mkdtemp(prefix="recipe-schnetpack-")  # the database, the split, the logs: outside the working tree
os.chdir(WORK)  # AtomsDataModule writes its lock file, splitting.lock, into the working directory
CUTOFF, ATOMS = 3.0, 4  # every molecule is CH3-like: one carbon, three hydrogens


def molecules(n: int, seed: int) -> tuple[list[ase.Atoms], list[dict[str, np.ndarray]]]:
    """Random CH3 geometries; energy: springs between every pair of atoms, forces = -dE/dR."""
    rng = np.random.default_rng(seed)
    atoms, properties = [], []
    rest = torch.tensor([[0.0, 1.1, 1.1, 1.1], [1.1, 0.0, 1.8, 1.8], [1.1, 1.8, 0.0, 1.8], [1.1, 1.8, 1.8, 0.0]])
    for _ in range(n):
        directions = rng.normal(size=(3, 3))
        hydrogens = 1.1 * directions / np.linalg.norm(directions, axis=1, keepdims=True)
        positions = np.vstack([np.zeros(3), hydrogens + rng.normal(scale=0.1, size=(3, 3))])
        R = torch.tensor(positions, requires_grad=True)
        distances = (R[:, None] - R[None] + torch.eye(ATOMS)[..., None]).norm(dim=-1)  # eye: no sqrt(0) on the diagonal
        energy = 0.5 * ((distances - rest) ** 2).triu(1).sum()
        (gradient,) = torch.autograd.grad(energy, R)
        atoms.append(ase.Atoms("CH3", positions=positions))
        properties.append({"energy": energy.detach().numpy()[None], "forces": -gradient.numpy()})
    return atoms, properties


def datamodule() -> spk.data.AtomsDataModule:
    """32 molecules for training, 16 for validation, in batches of 8; no worker processes."""
    return spk.data.AtomsDataModule(
        os.path.join(WORK, "molecules.db"),
        batch_size=8,
        num_train=32,
        num_val=16,
        split_file=os.path.join(WORK, "split.npz"),
        transforms=[trn.ASENeighborList(cutoff=CUTOFF), trn.CastTo32()],
        num_workers=0,
        distance_unit="Ang",
        property_units={"energy": "eV", "forces": "eV/Ang"},
    )


def task() -> spk.task.AtomisticTask:
    """PaiNN with 8 features and 2 interactions; loss on energy and forces, as schnetpack's tutorials do."""
    painn = spk.representation.PaiNN(
        n_atom_basis=8,
        n_interactions=2,
        radial_basis=spk.nn.GaussianRBF(n_rbf=6, cutoff=CUTOFF),
        cutoff_fn=spk.nn.CosineCutoff(CUTOFF),
    )
    potential = spk.model.NeuralNetworkPotential(
        representation=painn,
        input_modules=[spk.atomistic.PairwiseDistances()],
        output_modules=[spk.atomistic.Atomwise(n_in=8, output_key="energy"), spk.atomistic.Forces()],
    )
    outputs = [
        spk.task.ModelOutput(
            name, loss_fn=torch.nn.MSELoss(), loss_weight=w, metrics={"MAE": torchmetrics.MeanAbsoluteError()}
        )
        for name, w in (("energy", 0.1), ("forces", 0.9))
    ]
    return spk.task.AtomisticTask(potential, outputs, optimizer_cls=torch.optim.AdamW, optimizer_args={"lr": 1e-3})


def trainer(callbacks: list) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=2,
        inference_mode=False,  # validation needs grad (the forces); schnetpack's own configs set this too
        callbacks=callbacks,
        logger=pl.loggers.TensorBoardLogger(WORK),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )


atoms_list, property_list = molecules(48, seed=0)
spk.data.ASEAtomsData.create(
    os.path.join(WORK, "molecules.db"), distance_unit="Ang", property_unit_dict={"energy": "eV", "forces": "eV/Ang"}
).add_systems(property_list, atoms_list)
torch.manual_seed(0)
datamodule().setup()  # the random split (torch.randperm), saved to split.npz now: every fit below loads the same

# --8<-- [start:recipe]
from lightning_sensitivity import SensitivityMonitor  # noqa: E402


def energy(pl_module, batch, batch_idx):
    return pl_module(batch)["energy"]  # [molecules]


def forces(pl_module, batch, batch_idx):  # [atoms in the batch, 3] -> [molecules, atoms * 3]
    return pl_module(batch)["forces"].reshape(len(batch[P.n_atoms]), -1)  # every molecule has 4 atoms


targets = [
    "model.representation.embedding.weight[6, 0]",  # carbon's embedding (Z = 6), feature 0
    "model.representation.interactions.0.interatomic_context_net.0.weight[0, 1]",  # first interaction
    "model.output_modules.0.outnet.1.bias",  # the energy readout's bias: dE/db = atoms; forces: exact zeros
]
monitors = [
    SensitivityMonitor(targets, step=energy, prefix="energy"),
    SensitivityMonitor(targets, step=forces, prefix="forces"),
]
pl.seed_everything(0)
model, data = task(), datamodule()
fit = trainer(monitors)  # with Trainer(inference_mode=False)
fit.fit(model, datamodule=data)
print(monitors[1].summary()[targets[1]])  # TensorBoard: forces/<target>, forces/<target>/mean, ...
# --8<-- [end:recipe]

# ------------------------------------------------------------------------------------------------------ checks
# (b) a trainer.validate with the monitors leaves the model exactly as it was
before = snapshot(model)
fit.validate(model, datamodule=data, verbose=False)
assert_untouched(model, before)


def output(key: str):
    def evaluate(m: torch.nn.Module, batch: dict) -> torch.Tensor:
        m.eval()  # as in validation; but the Forces module with create_graph=True, as in training, so that the
        m.model.output_modules[1].train()  # forces have a graph to differentiate (PaiNN has no dropout)
        result = m({k: v.detach().clone() for k, v in batch.items()})[key]  # the model writes into the batch
        return result.reshape(len(batch[P.n_atoms]), -1)

    return evaluate


# (a) the numbers of that validate against the loop of torch.autograd.grad at the final weights
batches = list(data.val_dataloader())
summary, reference = {}, {}
for monitor, key in zip(monitors, ("energy", "forces"), strict=True):
    loop = loop_reference(model, targets, batches, output(key))
    summary.update({f"{key}/{label}": stats for label, stats in monitor.summary().items()})
    reference.update({f"{key}/{label}": values for label, values in loop.items()})
bias = f"forces/{targets[2]}"
assert torch.count_nonzero(reference[bias]) == 0, "the loop says the forces depend on the readout's bias"
assert summary[bias]["abs_mean"] == 0 and summary[bias]["max"] == 0, "the forces' bias sensitivities are not zero"

# (c) trained bit for bit as without the monitors
pl.seed_everything(0)
plain = task()
trainer([]).fit(plain, datamodule=datamodule())
with_monitors, without = model.state_dict(), plain.state_dict()
assert with_monitors.keys() == without.keys()
changed = [k for k in with_monitors if not torch.equal(with_monitors[k], without[k])]
assert not changed, f"the fit with the monitors differs from the fit without them in {changed}"

check("schnetpack", summary, reference)
