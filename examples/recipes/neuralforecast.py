"""neuralforecast: the per-sample sensitivities of an ``MLP`` forecaster's validation forecasts, with the monitor
passed through the model's trainer kwargs (``MLP(..., callbacks=[monitor])``) and trained by ``NeuralForecast.fit``.

neuralforecast deep-copies its models, trainer kwargs and callbacks included, before it fits them: the monitor
that runs is a copy of the one passed. A monitor's deep copies share its results, so the handle the user holds
reports what the copy found. The model's ``forward`` takes a dict of windows that ``validation_step`` cuts from
the batch of whole series; a ``step=`` function cuts them the same way with the model's own methods and returns
the forecast of every validation window, ``[windows, h, 1]``: a sample is one window. Targets: an element of the
first MLP layer's weight (hidden unit 0's weight on the second input lag) and the output layer's bias of the first
horizon step.

Checks: the monitor's numbers (read from the user's handle) against the loop of ``torch.autograd.grad`` over the
same windows at the final weights, the model left exactly as it was by a ``trainer.validate`` with the monitor,
and a fit bit for bit as without the monitor.

    python examples/recipes/neuralforecast.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# This script has the library's name: with its folder on sys.path, `import neuralforecast` would import the script.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from neuralforecast import NeuralForecast  # noqa: E402
from neuralforecast.models import MLP  # noqa: E402
from neuralforecast.tsdataset import TimeSeriesDataModule  # noqa: E402
from pytorch_lightning.loggers import TensorBoardLogger  # noqa: E402
from torch._C._functorch import is_functorch_wrapped_tensor  # noqa: E402

sys.path.insert(0, str(HERE))
from reference import assert_untouched, check, loop_reference, snapshot  # noqa: E402

LOGS = tempfile.mkdtemp(prefix="recipe-neuralforecast-")  # TensorBoard logs, outside the working tree

# three noisy sine series of 48 steps: the panel neuralforecast expects (unique_id, ds, y)
rng = np.random.default_rng(0)
t = np.arange(48)
df = pd.concat(
    pd.DataFrame({"unique_id": f"s{i}", "ds": t, "y": np.sin(t / 4 + i) + 0.1 * rng.normal(size=t.size)})
    for i in range(3)
)


def mlp(callbacks: list) -> MLP:
    """A small MLP: 8 lags in, 4 steps ahead; 10 training steps, validated every 5 (so at the final weights)."""
    return MLP(
        h=4,
        input_size=8,
        hidden_size=16,
        num_layers=2,
        max_steps=10,
        val_check_steps=5,
        random_seed=0,
        callbacks=callbacks,
        logger=TensorBoardLogger(LOGS),
        accelerator="cpu",
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )


# --8<-- [start:recipe]
from lightning_sensitivity import SensitivityMonitor  # noqa: E402


def forecast(pl_module, batch, batch_idx):
    """The forecast of every validation window, [windows, h, 1], cut as validation_step cuts it."""
    m, y_idx = pl_module, batch["y_idx"]
    temporal, static, static_cols, rows, weights, cols = m._create_windows(batch, step="val")
    windows = m._sample_windows(temporal, static, static_cols, cols, torch.arange(len(rows)), rows, weights)
    windows = m._normalization(windows, y_idx=y_idx)
    insample_y, insample_mask, _, _, hist, futr, stat = m._parse_windows(batch, windows)
    y_hat = m._predict_step_direct_batch(insample_y, insample_mask, hist, futr, stat, y_idx=y_idx)
    return y_hat


monitor = SensitivityMonitor(
    [
        "mlp.0.weight[0, 1]",  # first layer: hidden unit 0's weight on the second input lag
        "out.bias[0]",  # the output bias of horizon step 1: dy/db = 1 there, 0 at the other steps
    ],
    step=forecast,
)
nf = NeuralForecast(models=[mlp(callbacks=[monitor])], freq=1)
nf.fit(df, val_size=8)
print(monitor.summary()["mlp.0.weight[0, 1]"])  # the copy that ran shares its results with this handle
# --8<-- [end:recipe]

# ------------------------------------------------------------------------------------------------------ checks
model = nf.models[0]
fitted = monitor.summary()

# the monitor that ran is a copy (neuralforecast deep-copies the model and its trainer kwargs), and the user's
# handle reports what it found
(ran,) = [cb for cb in model.trainer_kwargs["callbacks"] if isinstance(cb, SensitivityMonitor)]
assert ran is not monitor, "neuralforecast ran the monitor passed, not a copy: this recipe's note is out of date"
assert ran.summary() == fitted, "the copy that ran and the user's handle report different results"


def assert_scaler_plain(after: str) -> None:
    """What the step stores on the scaler is a plain tensor, not one of the engine's functorch wrappers."""
    wrapped = [k for k, v in vars(model.scaler).items() if torch.is_tensor(v) and is_functorch_wrapped_tensor(v)]
    assert not wrapped, f"after {after}, model.scaler holds functorch-wrapped tensors: {wrapped}"


assert_scaler_plain("the fit")

# (b) a trainer.validate with the monitor leaves the model exactly as it was
datamodule = TimeSeriesDataModule(nf.dataset, valid_batch_size=1024)
before = snapshot(model)
trainer = pl.Trainer(callbacks=[monitor], logger=TensorBoardLogger(LOGS), accelerator="cpu", enable_progress_bar=False)
trainer.validate(model, datamodule=datamodule, verbose=False)
assert_untouched(model, before)
assert_scaler_plain("trainer.validate")
nf.save(path=str(Path(LOGS) / "saved"), overwrite=True)  # the fitted models still save


def output(m: torch.nn.Module, batch: dict) -> torch.Tensor:
    m.eval()  # as in validation
    return forecast(m, batch, 0)


# (a) the fit's last validation (read from the user's handle) and that validate, against the loop of
# torch.autograd.grad over the same windows at the final weights
reference = loop_reference(model, list(fitted), list(datamodule.val_dataloader()), output)
check("neuralforecast (the fit's last validation)", fitted, reference)

# (c) trained bit for bit as without the monitor
plain = NeuralForecast(models=[mlp(callbacks=[])], freq=1)
plain.fit(df, val_size=8)
with_monitor, without = model.state_dict(), plain.models[0].state_dict()
assert with_monitor.keys() == without.keys()
changed = [k for k in with_monitor if not torch.equal(with_monitor[k], without[k])]
assert not changed, f"the fit with the monitor differs from the fit without it in {changed}"

check("neuralforecast", monitor.summary(), reference)
