"""nequip: the per-sample sensitivities of a NequIP potential's energies and forces, trained with nequip's own
``NequIPLightningModule`` and ``NequIPDataModule`` in a Lightning ``Trainer``, as ``nequip-train`` builds them, on
tiny synthetic molecules written to an extxyz file.

The model (``NequIPGNNModel``, wrapped in ``ForceStressOutput``) takes the batch dict and returns a dict; its forces
are ``-autograd.grad(E, pos)`` inside ``forward``. Two monitors with their own ``step=`` and ``prefix`` watch the
two outputs: the total energy of each molecule ``[molecules, 1]`` and its forces, reshaped per molecule
``[molecules, atoms * 3]``. Targets: carbon's type embedding (element 0), an element of the first convolution's
radial MLP, and carbon's per-atom energy shift (a buffer: dE/dshift = the number of carbons; the forces do not
depend on it: exact zeros).

Checks: the monitors' numbers against the loop of ``torch.autograd.grad`` at the final weights, the model left
exactly as it was by a ``trainer.validate`` with the monitors, and a fit bit for bit as without them.

    python examples/recipes/nequip.py
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# This script has the library's name: with its folder on sys.path, `import nequip` would import the script.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

import ase  # noqa: E402
import ase.io  # noqa: E402
import lightning  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from ase.calculators.singlepoint import SinglePointCalculator  # noqa: E402
from nequip.data import AtomicDataDict  # noqa: E402
from nequip.data.datamodule import NequIPDataModule  # noqa: E402
from nequip.nn import ForceStressOutput  # noqa: E402
from nequip.train import NequIPLightningModule  # noqa: E402
from nequip.utils.global_state import set_global_state  # noqa: E402

sys.path.insert(0, str(HERE))
from reference import assert_untouched, check, loop_reference, snapshot  # noqa: E402

torch.set_num_threads(1)  # a model this small runs fastest on one thread (several contend on a busy CPU)
set_global_state()  # as nequip-train does first: float64 default dtype, e3nn's settings
WORK = tempfile.mkdtemp(prefix="recipe-nequip-")  # the data files and the logs: outside the working tree
R_MAX, ATOMS = 3.0, 4  # every molecule is CH3-like: one carbon, three hydrogens


def write_molecules(path: str, n: int, seed: int) -> None:
    """Random CH3 geometries, written as extxyz; energy: springs between every pair of atoms, forces = -dE/dR."""
    rng = np.random.default_rng(seed)
    rest = torch.tensor([[0.0, 1.1, 1.1, 1.1], [1.1, 0.0, 1.8, 1.8], [1.1, 1.8, 0.0, 1.8], [1.1, 1.8, 1.8, 0.0]])
    frames = []
    for _ in range(n):
        directions = rng.normal(size=(3, 3))
        hydrogens = 1.1 * directions / np.linalg.norm(directions, axis=1, keepdims=True)
        positions = np.vstack([np.zeros(3), hydrogens + rng.normal(scale=0.1, size=(3, 3))])
        R = torch.tensor(positions, requires_grad=True)
        distances = (R[:, None] - R[None] + torch.eye(ATOMS)[..., None]).norm(dim=-1)  # eye: no sqrt(0) on the diagonal
        energy = 0.5 * ((distances - rest) ** 2).triu(1).sum()
        (gradient,) = torch.autograd.grad(energy, R)
        atoms = ase.Atoms("CH3", positions=positions)
        atoms.calc = SinglePointCalculator(atoms, energy=energy.item(), forces=-gradient.numpy())
        frames.append(atoms)
    ase.io.write(path, frames, format="extxyz")


def dataset(path: str) -> dict:
    transforms = [
        {"_target_": "nequip.data.transforms.ChemicalSpeciesToAtomTypeMapper", "model_type_names": ["H", "C"]},
        {"_target_": "nequip.data.transforms.NeighborListTransform", "r_max": R_MAX},
    ]
    return {"_target_": "nequip.data.dataset.ASEDataset", "file_path": path, "transforms": transforms}


def datamodule() -> NequIPDataModule:
    """32 molecules for training, 16 for validation, in batches of 8; no worker processes."""
    return NequIPDataModule(
        seed=0,
        train_dataset=dataset(os.path.join(WORK, "train.xyz")),
        val_dataset=dataset(os.path.join(WORK, "val.xyz")),
        train_dataloader={"batch_size": 8, "shuffle": True},
        val_dataloader={"batch_size": 8},
    )


def training_module(data: NequIPDataModule) -> NequIPLightningModule:
    """A NequIP model with 2 layers, l_max 1, 4 features; loss on energy per atom and forces."""
    model = {
        "_target_": "nequip.model.NequIPGNNModel",
        "seed": 0,
        "model_dtype": "float32",
        "type_names": ["H", "C"],
        "r_max": R_MAX,
        "num_layers": 2,
        "l_max": 1,
        "num_features": 4,
        "radial_mlp_width": 8,
        "avg_num_neighbors": 3.0,
        "per_type_energy_scales": 1.0,
        "per_type_energy_shifts": {"H": -0.1, "C": 0.2},
    }
    return NequIPLightningModule(
        model=model,
        num_datasets=data.num_datasets,
        optimizer={"_target_": "torch.optim.Adam", "lr": 1e-2},
        loss={"_target_": "nequip.train.EnergyForceLoss"},
        val_metrics={"_target_": "nequip.train.EnergyForceMetrics"},
    )


def trainer(callbacks: list) -> lightning.Trainer:
    return lightning.Trainer(
        max_epochs=2,
        inference_mode=False,  # validation needs grad (the forces); nequip-train sets this itself
        callbacks=callbacks,
        logger=lightning.pytorch.loggers.TensorBoardLogger(WORK),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )


write_molecules(os.path.join(WORK, "train.xyz"), 32, seed=0)
write_molecules(os.path.join(WORK, "val.xyz"), 16, seed=1)

# --8<-- [start:recipe]
from lightning_sensitivity import SensitivityMonitor  # noqa: E402


def energy(pl_module, batch, batch_idx):
    return pl_module(batch)[AtomicDataDict.TOTAL_ENERGY_KEY]  # [molecules, 1]


def forces(pl_module, batch, batch_idx):  # [atoms in the batch, 3] -> [molecules, atoms * 3]
    molecules = len(batch[AtomicDataDict.NUM_NODES_KEY])
    return pl_module(batch)[AtomicDataDict.FORCE_KEY].reshape(molecules, -1)  # every molecule has 4 atoms


targets = [
    "model.sole_model.model.func.type_embed.embed_module.weight[1, 0]",  # carbon's type embedding, feature 0
    "model.sole_model.model.func.layer0_convnet.conv.edge_mlp.mlp.0.weight[0, 1]",  # first layer's radial MLP
    "model.sole_model.model.func.per_type_energy_scale_shift.shifts[1, 0]",  # carbon's energy shift (a buffer)
]
monitors = [
    SensitivityMonitor(targets, step=energy, prefix="energy"),
    SensitivityMonitor(targets, step=forces, prefix="forces"),
]
data = datamodule()
module = training_module(data)
fit = trainer(monitors)  # with Trainer(inference_mode=False), as nequip-train makes it
fit.fit(module, datamodule=data)
print(monitors[1].summary()[targets[1]])  # TensorBoard: forces/<target>, forces/<target>/mean, ...
# --8<-- [end:recipe]

# ------------------------------------------------------------------------------------------------------ checks
# (b) a trainer.validate with the monitors leaves the model exactly as it was
before = snapshot(module)
fit.validate(module, datamodule=data, verbose=False)
assert_untouched(module, before)


def output(key: str):
    def evaluate(m: torch.nn.Module, batch: dict) -> torch.Tensor:
        m.eval()  # as in validation; but ForceStressOutput with create_graph=True, as in training, so that
        for sub in m.modules():  # the forces have a graph to differentiate (NequIP has no dropout)
            if isinstance(sub, ForceStressOutput):
                sub.train()
        result = m({k: v.detach().clone() for k, v in batch.items()})[key]
        return result.reshape(len(batch[AtomicDataDict.NUM_NODES_KEY]), -1)

    return evaluate


# (a) the numbers of that validate against the loop of torch.autograd.grad at the final weights
data.setup("validate")
batches = list(data.val_dataloader()[0])
summary, reference = {}, {}
outputs = {"energy": AtomicDataDict.TOTAL_ENERGY_KEY, "forces": AtomicDataDict.FORCE_KEY}
for monitor, (prefix, key) in zip(monitors, outputs.items(), strict=True):
    loop = loop_reference(module, targets, batches, output(key))
    summary.update({f"{prefix}/{label}": stats for label, stats in monitor.summary().items()})
    reference.update({f"{prefix}/{label}": values for label, values in loop.items()})
shift = f"forces/{targets[2]}"
assert torch.count_nonzero(reference[shift]) == 0, "the loop says the forces depend on the energy shift"
assert summary[shift]["abs_mean"] == 0 and summary[shift]["max"] == 0, "the forces' shift sensitivities are not zero"

# (c) trained bit for bit as without the monitors
plain_data = datamodule()
plain = training_module(plain_data)
trainer([]).fit(plain, datamodule=plain_data)
with_monitors, without = module.state_dict(), plain.state_dict()
assert with_monitors.keys() == without.keys()
same = {k: torch.equal(v, without[k]) if torch.is_tensor(v) else v == without[k] for k, v in with_monitors.items()}
changed = [k for k, equal in same.items() if not equal]  # ^ a few entries are extra state (dicts), not tensors
assert not changed, f"the fit with the monitors differs from the fit without them in {changed}"

check("nequip", summary, reference)
