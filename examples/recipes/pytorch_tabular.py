"""pytorch_tabular: the per-sample sensitivities of a ``TabularModel`` regression (CategoryEmbedding model), with
the monitor passed through ``TabularModel.fit(callbacks=...)``.

The model's ``forward`` takes the batch dict (``continuous``, ``categorical``, ``target``) and returns a dict, so a
``step=`` function returns the prediction, ``pl_module(batch)["logits"]``. Targets: an element of the first
layer's weight (the one that multiplies the continuous feature ``x1``), the output bias of the head, and ``x1``
itself, per sample (``batch['continuous'][:, 0]``).

Checks: the monitor's numbers against the loop of ``torch.autograd.grad`` at the final weights, the model left
exactly as it was by a ``trainer.validate`` with the monitor, and a fit bit for bit as without the monitor.

    python examples/recipes/pytorch_tabular.py
"""

# ruff: noqa: E402  (imports follow the sys.path fix below, and the recipe section imports what it uses)
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# This script has the library's name: with its folder on sys.path, `import pytorch_tabular` would import the script.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

import numpy as np
import pandas as pd
import torch
from pytorch_tabular import TabularModel
from pytorch_tabular.config import DataConfig, ExperimentConfig, OptimizerConfig, TrainerConfig
from pytorch_tabular.models import CategoryEmbeddingModelConfig

sys.path.insert(0, str(HERE))
from reference import assert_untouched, check, input_reference, loop_reference, snapshot

LOGS = tempfile.mkdtemp(prefix="recipe-pytorch-tabular-")  # TensorBoard logs, outside the working tree


def table(n: int, seed: int) -> pd.DataFrame:
    """Two continuous features and one categorical, y = 2 x1 - x2^2 + [color = red] + noise."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "x1": rng.normal(size=n),
            "x2": rng.normal(size=n),
            "color": rng.choice(["red", "green", "blue"], size=n),
        }
    )
    frame["y"] = 2 * frame.x1 - frame.x2**2 + (frame.color == "red") + 0.1 * rng.normal(size=n)
    return frame


def tabular_model() -> TabularModel:
    """A small CategoryEmbedding regression; no checkpoints, no progress bar, logs in a temporary folder."""
    return TabularModel(
        data_config=DataConfig(target=["y"], continuous_cols=["x1", "x2"], categorical_cols=["color"]),
        model_config=CategoryEmbeddingModelConfig(task="regression", layers="16-8", learning_rate=1e-2),
        optimizer_config=OptimizerConfig(),
        trainer_config=TrainerConfig(
            batch_size=16,
            max_epochs=10,
            accelerator="cpu",
            checkpoints=None,
            early_stopping=None,
            load_best=False,
            progress_bar="none",
            trainer_kwargs={"enable_model_summary": False},
        ),
        experiment_config=ExperimentConfig(project_name=LOGS, log_target="tensorboard"),
        verbose=False,
    )


train, validation = table(64, seed=0), table(32, seed=1)

# --8<-- [start:recipe]
from lightning_sensitivity import SensitivityMonitor


def prediction(pl_module, batch, batch_idx):
    return pl_module(batch)["logits"]  # forward takes the batch dict, returns a dict; [B, 1]


monitor = SensitivityMonitor(
    [
        "_backbone.linear_layers.0.weight[0, 0]",  # first layer: unit 0's weight on x1
        "head.layers.0.bias",  # the output bias: dy/db = 1 for every sample
        "batch['continuous'][:, 0]",  # x1 itself (as the datamodule scaled it), each sample's own
    ],
    step=prediction,
)
model = tabular_model()
model.fit(train=train, validation=validation, callbacks=[monitor], seed=0)
print(monitor.summary()["batch['continuous'][:, 0]"])  # TensorBoard: sensitivity/batch['continuous'][:, 0]
# --8<-- [end:recipe]

# ------------------------------------------------------------------------------------------------------ checks
module = model.model
val_loader = model.datamodule.val_dataloader()

# (b) a trainer.validate with the monitor leaves the model exactly as it was
before = snapshot(module)
model.trainer.validate(module, dataloaders=val_loader, verbose=False)
assert_untouched(module, before)


def output(m: torch.nn.Module, batch: dict) -> torch.Tensor:
    m.eval()  # as in validation
    return m(batch)["logits"]


# (a) the numbers of that validate against the loop of torch.autograd.grad at the final weights
batches = list(val_loader)
parameters = ["_backbone.linear_layers.0.weight[0, 0]", "head.layers.0.bias"]
reference = loop_reference(module, parameters, batches, output)
reference["batch['continuous'][:, 0]"] = input_reference(module, batches, output, "continuous", 0)

# (c) trained bit for bit as without the monitor
plain = tabular_model()
plain.fit(train=train, validation=validation, seed=0)
with_monitor, without = module.state_dict(), plain.model.state_dict()
assert with_monitor.keys() == without.keys()
changed = [k for k in with_monitor if not torch.equal(with_monitor[k], without[k])]
assert not changed, f"the fit with the monitor differs from the fit without it in {changed}"

check("pytorch_tabular", monitor.summary(), reference)
