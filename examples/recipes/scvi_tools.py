"""scvi_tools: the per-cell sensitivities of an SCVI model's latent posterior mean, with the monitor passed
through ``SCVI.train(callbacks=...)``.

``SCVI.train`` hands its extra keyword arguments to scvi's ``Trainer`` (a Lightning Trainer), ``callbacks``
included. The LightningModule is scvi's ``TrainingPlan``; its batch is a dict (``"X"``: the counts, ``"batch"``:
the batch index), and its ``forward`` returns the loss, so a ``step=`` function returns what to differentiate:
the encoder's posterior mean ``qz.loc`` of each cell, ``[cells, n_latent]``. Targets: a weight of the encoder's
first layer (scvi names it ``fc_layers.Layer 0``, with a space), a weight of the layer that gives the posterior
mean, and each cell's own count of gene 3 (``batch['X'][:, 3]``).

Checks: the monitor's numbers against the loop of ``torch.autograd.grad`` at the final weights, the model left
exactly as it was by a ``trainer.validate`` with the monitor, and a fit bit for bit as without the monitor.

    python examples/recipes/scvi_tools.py
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

import anndata
import numpy as np
import scvi
import torch
from lightning.pytorch.loggers import TensorBoardLogger

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference import assert_untouched, check, input_reference, loop_reference, snapshot  # noqa: E402

LOGS = tempfile.mkdtemp(prefix="recipe-scvi-tools-")  # TensorBoard logs, outside the working tree
warnings.filterwarnings("ignore", message=".*does not have many workers.*")  # scvi's loaders use no workers


def cells(n_cells: int = 300, n_genes: int = 50) -> anndata.AnnData:
    """Negative-binomial counts: two groups of cells with different mean expression of every gene."""
    rng = np.random.default_rng(0)
    means = rng.gamma(2.0, 2.0, size=(2, n_genes))[rng.integers(0, 2, size=n_cells)]
    counts = rng.negative_binomial(5, 5 / (5 + means)).astype(np.float32)
    adata = anndata.AnnData(counts)
    scvi.model.SCVI.setup_anndata(adata)
    return adata


def untrained() -> scvi.model.SCVI:
    """A small SCVI (one hidden layer of 16 units, 4 latent dimensions), initialised from seed 0."""
    scvi.settings.seed = 0
    return scvi.model.SCVI(cells(), n_hidden=16, n_latent=4, n_layers=1)


# the rest of SCVI.train's arguments: 2 epochs of batches of 64 cells, 80 % of the cells to train on
TRAINING = dict(max_epochs=2, batch_size=64, train_size=0.8, accelerator="cpu", enable_progress_bar=False)

# --8<-- [start:recipe]
from lightning_sensitivity import SensitivityMonitor  # noqa: E402


def latent_mean(pl_module, batch, batch_idx):  # pl_module: scvi's TrainingPlan; pl_module.module: the VAE
    return pl_module.module.inference(batch["X"], batch["batch"])["qz"].loc  # [cells, n_latent]


monitor = SensitivityMonitor(
    [
        "module.z_encoder.encoder.fc_layers.Layer 0.0.weight[0, 1]",  # hidden unit 0's weight on gene 1
        "module.z_encoder.mean_encoder.weight[2, 0]",  # latent dimension 2's weight on hidden unit 0
        "batch['X'][:, 3]",  # each cell's own count of gene 3
    ],
    step=latent_mean,
)
model = untrained()  # scvi.model.SCVI(adata, ...)
model.train(**TRAINING, check_val_every_n_epoch=1, callbacks=[monitor], logger=TensorBoardLogger(LOGS))
print(monitor.summary()["batch['X'][:, 3]"])  # TensorBoard: sensitivity/batch['X'][:, 3]
# --8<-- [end:recipe]

# ------------------------------------------------------------------------------------------------------ checks
plan = model.trainer.lightning_module  # the TrainingPlan the monitor ran on
val_loader = model.trainer.datamodule.val_dataloader()

# (b) a trainer.validate with the monitor leaves the model exactly as it was
before = snapshot(plan)
model.trainer.validate(plan, dataloaders=val_loader, verbose=False)
assert_untouched(plan, before)


def output(m: torch.nn.Module, batch: dict) -> torch.Tensor:
    m.eval()  # as in validation
    return m.module.inference(batch["X"], batch["batch"])["qz"].loc


# (a) the numbers of that validate against the loop of torch.autograd.grad at the final weights
batches = list(val_loader)
parameters = ["module.z_encoder.encoder.fc_layers.Layer 0.0.weight[0, 1]", "module.z_encoder.mean_encoder.weight[2, 0]"]
reference = loop_reference(plan, parameters, batches, output)
reference["batch['X'][:, 3]"] = input_reference(plan, batches, output, "X", 3)

# (c) trained bit for bit as without the monitor
plain = untrained()
plain.train(**TRAINING, check_val_every_n_epoch=1, logger=TensorBoardLogger(LOGS))
with_monitor, without = model.module.state_dict(), plain.module.state_dict()
assert with_monitor.keys() == without.keys()
changed = [k for k in with_monitor if not torch.equal(with_monitor[k], without[k])]
assert not changed, f"the fit with the monitor differs from the fit without it in {changed}"
initial = untrained().module.state_dict()
assert any(not torch.equal(initial[k], v) for k, v in without.items()), "the fit changed no weight"

check("scvi_tools", monitor.summary(), reference)
