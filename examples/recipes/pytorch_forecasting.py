"""pytorch-forecasting: the per-sample sensitivities of the forecasts of a ``TemporalFusionTransformer`` and of an
interpretable ``NBeats`` (trend + seasonality stacks), each trained by a lightning ``Trainer`` as pytorch-forecasting's
tutorials train them, the monitor among the Trainer's callbacks.

The models' ``forward`` takes the batch's ``x`` (a dict of tensors) and returns an output object, so a ``step=``
function returns its prediction tensor, ``pl_module(batch[0])["prediction"]``: a sample is one window (encoder +
prediction length) of one series. Targets: for the TFT, an element of the output layer's weight (the median
quantile) and one of the decoder's variable-selection network for the known covariate ``x``; for N-BEATS, an element
of the trend block's theta layer (one ``nn.Linear`` registered as both ``theta_b_fc`` and ``theta_f_fc``) and one
of its first fully connected layer.

Checks, for each model: the monitor's numbers against the loop of ``torch.autograd.grad`` at the final weights, the
model left exactly as it was by a ``trainer.validate`` with the monitor (every Parameter by every name it has: the
shared theta layer by both), and a fit bit for bit as without the monitor.

    python examples/recipes/pytorch_forecasting.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# This script has the library's name: with its folder on sys.path, `import pytorch_forecasting` would import it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

import lightning.pytorch as pl  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from pytorch_forecasting import NBeats, TemporalFusionTransformer, TimeSeriesDataSet  # noqa: E402

sys.path.insert(0, str(HERE))
from reference import assert_untouched, check, loop_reference, snapshot  # noqa: E402

LOGS = tempfile.mkdtemp(prefix="recipe-pytorch-forecasting-")  # TensorBoard logs, outside the working tree

# two noisy sine series of 60 steps, with a known covariate x; the last 19 steps are validation
rng = np.random.default_rng(0)
t = np.arange(60)
frame = pd.concat(
    [
        pd.DataFrame({"series": str(s), "time_idx": t, "x": np.cos(t / 4 + s), "value": 2 + np.sin(t / 4 + s)})
        for s in range(2)
    ],
    ignore_index=True,
)
frame["value"] += 0.1 * rng.normal(size=len(frame))


def loaders(covariates: list[str]):
    """The training and validation windows (12 steps in, 4 out) as pytorch-forecasting's dataloaders."""
    train = TimeSeriesDataSet(
        frame[frame.time_idx <= 40],
        time_idx="time_idx",
        target="value",
        group_ids=["series"],
        time_varying_unknown_reals=["value"],
        time_varying_known_reals=covariates,
        max_encoder_length=12,
        min_encoder_length=12,
        max_prediction_length=4,
        min_prediction_length=4,
    )
    validation = TimeSeriesDataSet.from_dataset(train, frame, min_prediction_idx=41)
    return train, train.to_dataloader(train=True, batch_size=8), validation.to_dataloader(train=False, batch_size=8)


def tft(train: TimeSeriesDataSet) -> TemporalFusionTransformer:
    return TemporalFusionTransformer.from_dataset(
        train, hidden_size=8, attention_head_size=1, hidden_continuous_size=4, learning_rate=1e-2, log_interval=-1
    )


def nbeats(train: TimeSeriesDataSet) -> NBeats:
    return NBeats.from_dataset(
        train, widths=[8, 8], num_blocks=[1, 1], num_block_layers=[2, 2], expansion_coefficient_lengths=[3, 3],
        learning_rate=1e-2, log_interval=-1,
    )  # fmt: skip


def setup(make, covariates: list[str]):
    """A model (``tft`` or ``nbeats``) and its dataloaders, from one seed."""
    pl.seed_everything(0)
    train, train_dataloader, val_dataloader = loaders(covariates)
    return make(train), train_dataloader, val_dataloader


def trainer(callbacks: list) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=2,
        limit_train_batches=4,
        gradient_clip_val=0.1,
        callbacks=callbacks,
        logger=TensorBoardLogger(LOGS),
        accelerator="cpu",
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )


# --8<-- [start:recipe]
from lightning_sensitivity import SensitivityMonitor  # noqa: E402


def prediction(pl_module, batch, batch_idx):
    return pl_module(batch[0])["prediction"]  # forward takes x (a dict), returns an output object; [B, 4, ...]


tft_monitor = SensitivityMonitor(
    [
        "output_layer.weight[3, 0]",  # the median quantile's weight on hidden unit 0: [B, 4, 7 quantiles]
        "decoder_variable_selection.single_variable_grns.x.fc1.weight[0, 0]",  # how the known covariate x enters
    ],
    step=prediction,
)
tft_model, train_dataloader, val_dataloader = setup(tft, covariates=["x"])
trainer([tft_monitor]).fit(tft_model, train_dataloaders=train_dataloader, val_dataloaders=val_dataloader)

# N-BEATS takes the target alone; its trend and seasonality blocks register one theta layer under two names
nbeats_monitor = SensitivityMonitor(
    [
        "net_blocks.0.theta_f_fc.weight[0, 1]",  # the trend block's theta layer (= net_blocks.0.theta_b_fc)
        "net_blocks.0.fc.0.weight[0, 0]",  # its first fully connected layer
    ],
    step=prediction,
)
nbeats_model, nbeats_train, nbeats_val = setup(nbeats, covariates=[])
trainer([nbeats_monitor]).fit(nbeats_model, train_dataloaders=nbeats_train, val_dataloaders=nbeats_val)
print(tft_monitor.summary(), nbeats_monitor.summary())  # TensorBoard: sensitivity/<target>, sensitivity/summary
# --8<-- [end:recipe]


# ------------------------------------------------------------------------------------------------------ checks
def output(m: torch.nn.Module, batch) -> torch.Tensor:
    m.eval()  # as in validation
    return m(batch[0])["prediction"]


def checks(name: str, model, monitor, make, covariates: list[str]) -> None:
    """(b) a trainer.validate with the monitor leaves the model exactly as it was; (a) the numbers of that validate
    against the loop of torch.autograd.grad at the final weights; (c) trained bit for bit as without the monitor."""
    _, _, val = loaders(covariates)
    before = snapshot(model)
    trainer([monitor]).validate(model, dataloaders=val, verbose=False)
    assert_untouched(model, before)
    reference = loop_reference(model, list(monitor.summary()), list(val), output)

    plain, train_loader, val_loader = setup(make, covariates)
    trainer([]).fit(plain, train_dataloaders=train_loader, val_dataloaders=val_loader)
    with_monitor, without = model.state_dict(), plain.state_dict()
    assert with_monitor.keys() == without.keys()
    changed = [k for k in with_monitor if not torch.equal(with_monitor[k], without[k])]
    assert not changed, f"{name}: the fit with the monitor differs from the fit without it in {changed}"
    check(name, monitor.summary(), reference)


# N-BEATS's sharing is what is at stake: one nn.Linear under both names, before and after
blocks = nbeats_model.net_blocks
assert blocks[0].theta_b_fc is blocks[0].theta_f_fc and blocks[1].theta_b_fc is blocks[1].theta_f_fc

checks("pytorch_forecasting-tft", tft_model, tft_monitor, tft, covariates=["x"])
checks("pytorch_forecasting", nbeats_model, nbeats_monitor, nbeats, covariates=[])
assert blocks[0].theta_b_fc is blocks[0].theta_f_fc and blocks[1].theta_b_fc is blocks[1].theta_f_fc
