"""Validate and fit a small model with SensitivityMonitor, sharded with FSDP2 (``fully_shard``) under Lightning's
``ModelParallelStrategy`` on 2 CPU processes, or on one process unsharded (the reference); run by
test_fsdp.py in a subprocess.

Usage, from the repository root: python -m tests.end_to_end.fsdp_script OUT_DIR {sharded|single} {call|nocall}
  call:   validation_step runs the model, so FSDP is initialised before the monitor's first forward;
  nocall: validation_step does not, so the monitor's forward is FSDP's first.
Writes TensorBoard events under OUT_DIR and, per rank, the monitor's summary to OUT_DIR/summary_rank<r>.pt.
"""

from __future__ import annotations

import sys

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader

from lightning_sensitivity import SensitivityMonitor
from tests.helpers import FSDP_TARGETS, physics_data


class Sharded(L.LightningModule):
    def __init__(self, shard: bool, call: bool):
        super().__init__()
        self.shard, self.call = shard, call
        torch.manual_seed(0)
        self.k = nn.Parameter(torch.tensor([-5.0]))
        self.net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3))

    def configure_model(self):
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if self.shard and not isinstance(self, FSDPModule):
            mesh = self.device_mesh["data_parallel"]
            fully_shard(self.net[0], mesh=mesh)
            fully_shard(self, mesh=mesh)

    def forward(self, x):
        return self.k * x[:, :1] + self.net(x)

    def training_step(self, batch, batch_idx):
        return (self(batch[0]) - batch[1]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        if self.call:
            self.log("val_loss", (self(batch[0]) - batch[1]).pow(2).mean(), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def main(out_dir: str, kind: str, call: str) -> None:
    shard = kind == "sharded"
    monitor = SensitivityMonitor(FSDP_TARGETS, normalize="parameter", profiles=True, log_figures=False)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2 if shard else 1,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if shard else "auto",
        max_epochs=1,
        limit_train_batches=1,
        logger=TensorBoardLogger(out_dir, name="", version=""),
        callbacks=[monitor],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    model = Sharded(shard, call == "call")
    val = DataLoader(physics_data(16, seed=1), batch_size=4)
    trainer.validate(model, val)
    validated = monitor.summary()
    trainer.fit(model, DataLoader(physics_data(8, seed=0), batch_size=4), val)
    result = {"validate": validated, "fit": monitor.summary(), "profiles": monitor.profiles()}
    torch.save(result, f"{out_dir}/summary_rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:4])
