"""chemprop: the per-sample sensitivities of an MPNN regression on small molecules, trained with a Lightning
Trainer as chemprop's documentation does, once plain and once with extra molecule descriptors (X_d).

Targets: an element of the FFN's output-layer weight (its weight on one hidden unit), an element of the first
message-passing weight (the one that multiplies "the bond's source atom is carbon"), and, with X_d, the first
descriptor itself, each molecule's own (``batch[2][:, 0]``: chemprop's batch is a ``TrainingBatch`` named tuple,
``(bmg, V_d, X_d, Y, w, lt_mask, gt_mask)``).

Checks: the monitor's numbers against the loop of ``torch.autograd.grad`` at the final weights, the model left
exactly as it was by a ``trainer.validate`` with the monitor, and a fit bit for bit as without the monitor; for
X_d, also the monitor without ``step=`` against the same loop.

    python examples/recipes/chemprop.py
"""

# ruff: noqa: E402  (imports follow the sys.path fix below, and the recipe section imports what it uses)
from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# This script has the library's name: with its folder on sys.path, `import chemprop` would import the script.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

import lightning.pytorch as pl
import numpy as np
import torch
from chemprop import data, featurizers, models
from chemprop import nn as cnn
from lightning.pytorch.loggers import TensorBoardLogger

sys.path.insert(0, str(HERE))
from reference import assert_untouched, check, loop_reference, snapshot

LOGS = tempfile.mkdtemp(prefix="recipe-chemprop-")  # TensorBoard logs, outside the working tree
EPOCHS = 4
# small alkanes and alcohols; target y = 0.5 (carbons) - (oxygens) [+ descriptor 0] + noise
SMILES = ["C", "CC", "CCC", "CCCC", "CC(C)C", "CCCCC", "CC(C)CC", "CCCCCC", "C1CCCCC1", "CO", "CCO", "CCCO",
          "CC(C)O", "CCCCO", "CC(C)(C)O", "OCCO", "CC(O)CO", "OCC(O)CO", "CCCCCO", "OC1CCCCC1", "CCC(C)O",
          "CCOCC", "COC", "CCCCCCO"]  # fmt: skip


def loaders(with_descriptors: bool):
    """chemprop's datasets and dataloaders: 16 molecules to train on, 8 to validate on."""
    rng = np.random.default_rng(0)
    descriptors = rng.normal(size=(len(SMILES), 2)).astype(np.float32)
    y = np.array([[0.5 * s.count("C") - s.count("O")] for s in SMILES]) + 0.05 * rng.normal(size=(len(SMILES), 1))
    if with_descriptors:
        y = y + descriptors[:, :1]
    points = [
        data.MoleculeDatapoint.from_smi(s, yi, x_d=xi if with_descriptors else None)
        for s, yi, xi in zip(SMILES, y, descriptors, strict=True)
    ]
    featurizer = featurizers.SimpleMoleculeMolGraphFeaturizer()
    train = data.MoleculeDataset(points[:16], featurizer)
    val = data.MoleculeDataset(points[16:], featurizer)
    return (
        data.build_dataloader(train, batch_size=4, num_workers=0, seed=0),
        data.build_dataloader(val, batch_size=4, num_workers=0, shuffle=False),
    )


def mpnn(descriptors: int = 0) -> models.MPNN:
    """A small MPNN: bond message passing, mean aggregation, a one-hidden-layer regression FFN."""
    pl.seed_everything(0, verbose=False)
    mp = cnn.BondMessagePassing(d_h=32, depth=2)
    ffn = cnn.RegressionFFN(input_dim=mp.output_dim + descriptors, hidden_dim=16, n_layers=1)
    return models.MPNN(mp, cnn.MeanAggregation(), ffn, max_lr=1e-2)


def fit(model, train_loader, val_loader, callbacks):
    """The recipe's Trainer, with other callbacks."""
    trainer = pl.Trainer(logger=TensorBoardLogger(LOGS), max_epochs=EPOCHS, callbacks=callbacks)
    trainer.fit(model, train_loader, val_loader)
    return trainer


train_loader, val_loader = loaders(with_descriptors=False)
train_xd, val_xd = loaders(with_descriptors=True)
model, model_xd = mpnn(), mpnn(descriptors=2)

# --8<-- [start:recipe]
from lightning_sensitivity import SensitivityMonitor

weights = [
    "predictor.ffn.1.2.weight[0, 10]",  # the FFN's output layer: its weight on hidden unit 10
    "message_passing.W_i.weight[5, 5]",  # first message-passing weight on "the source atom is carbon"
]
# The plain MPNN: its validation step calls model(bmg, V_d, X_d) with the batch's bmg first, so no step is needed.
monitor = SensitivityMonitor(weights)
trainer = pl.Trainer(logger=TensorBoardLogger(LOGS), max_epochs=EPOCHS, callbacks=[monitor])
trainer.fit(model, train_loader, val_loader)


# With extra molecule descriptors: say what to differentiate, the prediction with X_d ([molecules, tasks]).
def prediction(pl_module, batch, batch_idx):
    return pl_module(batch.bmg, batch.V_d, batch.X_d)


monitor_xd = SensitivityMonitor([*weights, "batch[2][:, 0]"], step=prediction)  # batch[2] is X_d
trainer_xd = pl.Trainer(logger=TensorBoardLogger(LOGS), max_epochs=EPOCHS, callbacks=[monitor_xd])
trainer_xd.fit(model_xd, train_xd, val_xd)
print(monitor_xd.summary()["batch[2][:, 0]"])  # TensorBoard: sensitivity/batch[2][:, 0], ...
# --8<-- [end:recipe]

# ------------------------------------------------------------------------------------------------------ checks


def validation_copy(m: models.MPNN) -> models.MPNN:
    """A copy in the modes chemprop validates in (its on_validation_model_eval: eval, its transforms train)."""
    copied = copy.deepcopy(m)
    copied.on_validation_model_eval()
    return copied


def output(m: models.MPNN, batch) -> torch.Tensor:
    return m(batch.bmg, batch.V_d, batch.X_d)


def descriptor_reference(m: models.MPNN, batches: list, column: int) -> torch.Tensor:
    """d y_i / d X_d[i, column] for every output element of every molecule, one autograd.grad each."""
    copied = validation_copy(m)
    values = []
    for batch in batches:
        x = batch.X_d.detach().clone().requires_grad_(True)
        out = copied(batch.bmg, batch.V_d, x)
        for i in range(out.shape[0]):
            for element in out[i].reshape(-1):
                (g,) = torch.autograd.grad(element, x, retain_graph=True)
                values.append(g[i, column].detach())
    return torch.stack(values).double()


def checks(name, module, trainer, monitor, val_loader, descriptors):
    # (b) a trainer.validate with the monitor leaves the model exactly as it was
    before = snapshot(module)
    trainer.validate(module, val_loader, verbose=False)
    assert_untouched(module, before)
    # (a) the numbers of that validate against the loop of torch.autograd.grad at the final weights
    batches = list(val_loader)
    reference = loop_reference(module, weights, batches, output, clone=validation_copy)
    if descriptors:
        reference["batch[2][:, 0]"] = descriptor_reference(module, batches, 0)
    # (c) trained bit for bit as without the monitor (fresh loaders: a seeded sampler moves on with each epoch)
    plain = mpnn(descriptors)
    fit(plain, *loaders(with_descriptors=descriptors > 0), callbacks=[])
    with_monitor, without = module.state_dict(), plain.state_dict()
    assert with_monitor.keys() == without.keys()
    changed = [k for k in with_monitor if not torch.equal(with_monitor[k], without[k])]
    assert not changed, f"{name}: the fit with the monitor differs from the fit without it in {changed}"
    check(name, monitor.summary(), reference)
    return reference


checks("chemprop", model, trainer, monitor, val_loader, 0)
reference_xd = checks("chemprop (X_d)", model_xd, trainer_xd, monitor_xd, val_xd, 2)

# (d) with X_d, the monitor without step= (chemprop's validation step calls model(bmg, V_d, X_d), and the monitor
# differentiates that call with every argument it was given) gives the same numbers
default = SensitivityMonitor([*weights, "batch[2][:, 0]"], log_histograms=False)
pl.Trainer(logger=False, callbacks=[default], enable_progress_bar=False).validate(model_xd, val_xd, verbose=False)
check("chemprop (X_d, no step)", default.summary(), reference_xd)
