"""Fit a small model with SensitivityMonitor on 1 or 2 CPU processes; run by test_ddp.py in a subprocess.

Usage, from the repository root:
    python -m tests.end_to_end.ddp_script OUT_DIR DEVICES N_VAL [--keep-duplicates] [--then-single]
Lightning's DDP launcher starts the second process by running this same command again. With --then-single,
every process then validates on one device, as a notebook or sweep script would after a DDP fit, while the
DDP run's process group is still alive; each writes under OUT_DIR/single_rank<r>.
"""

from __future__ import annotations

import sys

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from lightning_sensitivity import SensitivityMonitor
from tests.helpers import physics_data


class Physics(L.LightningModule):
    """``y = C * x[:, :1] + net(x)``; learning rate 0, so every run sees the same weights."""

    def __init__(self):
        super().__init__()
        self.C = nn.Parameter(torch.tensor(-5.0))
        self.net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x):
        return self.C * x[:, :1] + self.net(x)

    def training_step(self, batch, batch_idx):
        return F.mse_loss(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.mse_loss(self(batch[0]), batch[1]), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def main(out_dir: str, devices: int, n_val: int, keep_duplicates: bool, then_single: bool, spawn: bool) -> None:
    torch.manual_seed(0)
    monitor = SensitivityMonitor(["C", "net.0.weight[3, 1]"], drop_padded_duplicates=not keep_duplicates)
    analysis = SensitivityMonitor(
        ["C", "net.0.weight[3, 1]", "net.2.bias[1]", "batch[0][:, 1]"],
        normalize="relative",
        profiles=True,
        prefix="analysis",
        log_figures=False,
        drop_padded_duplicates=not keep_duplicates,
        noise_std=0.1,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=("ddp_spawn" if spawn else "ddp") if devices > 1 else "auto",
        max_epochs=2,
        limit_train_batches=2,
        logger=TensorBoardLogger(out_dir, name="", version=""),
        callbacks=[monitor, analysis],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    model = Physics()
    trainer.fit(
        model, DataLoader(physics_data(16, seed=0), batch_size=4), DataLoader(physics_data(n_val, seed=1), batch_size=4)
    )
    if spawn:  # the monitors ran on copies in the spawned processes: only the event files tell
        return
    result = {
        "summary": analysis.summary(),
        "correlation": analysis.correlation(),
        "profiles": analysis.profiles(),
        "fisher": analysis.fisher(),
        "covariance": analysis.covariance(),
        "identifiability": analysis.identifiability(),
    }
    torch.save(result, f"{out_dir}/analysis_rank{trainer.global_rank}.pt")
    if then_single:
        rank = trainer.global_rank
        single = L.Trainer(
            accelerator="cpu",
            devices=1,
            logger=TensorBoardLogger(out_dir, name=f"single_rank{rank}", version=""),
            callbacks=[SensitivityMonitor(["C"])],
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        single.validate(model, DataLoader(physics_data(n_val, seed=1), batch_size=4))


if __name__ == "__main__":
    flags = {flag: flag in sys.argv for flag in ("--keep-duplicates", "--then-single", "--spawn")}
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *flags.values())
