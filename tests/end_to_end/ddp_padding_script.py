"""Validate on 1 or 2 CPU processes where the DistributedSampler pads, with batches and outputs whose rows are not
the sampler's samples; run by test_ddp.py in a subprocess.

Usage, from the repository root: python -m tests.end_to_end.ddp_padding_script OUT_DIR DEVICES
Each process writes OUT_DIR/padding_rank<r>.pt: per case, the monitor's summary of ``k`` or the error it raised.
"""

from __future__ import annotations

import sys

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_sensitivity import SensitivityMonitor


class Scale(L.LightningModule):
    """``y = k * x``: dy/dk = x."""

    def __init__(self):
        super().__init__()
        self.k = nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        return self.k * x

    def validation_step(self, batch, batch_idx):
        pass


class Flat(Scale):
    """Rows of the output that are not samples: each sample's 4 outputs, flattened."""

    def sensitivity_step(self, batch, batch_idx):
        return self(batch[0]).reshape(-1)


class Filter(Scale):
    """Some samples only: those whose first input is a multiple of 8."""

    def sensitivity_step(self, batch, batch_idx):
        x = batch[0]
        return self(x[x[:, 0] % 8 == 0])


class Batches(Dataset):
    """5 items, each already a batch of 3 samples ``[3, 1]`` (for ``DataLoader(batch_size=None)``)."""

    def __len__(self):
        return 5

    def __getitem__(self, i):
        return (torch.arange(3.0 * i + 1, 3.0 * i + 4).reshape(3, 1),)


def samples(n: int) -> TensorDataset:
    return TensorDataset(torch.arange(4.0 * n).reshape(n, 4))


CASES = {  # name: (LightningModule class, dataloader)
    "batches": (Scale, lambda: DataLoader(Batches(), batch_size=None)),
    "flat": (Flat, lambda: DataLoader(samples(5), batch_size=4)),
    "flat-even": (Flat, lambda: DataLoader(samples(6), batch_size=4)),
    "filter": (Filter, lambda: DataLoader(samples(5), batch_size=4)),
}


def main(out_dir: str, devices: int) -> None:
    results = {}
    rank = 0
    for name, (module, loader) in CASES.items():
        monitor = SensitivityMonitor("k", log_histograms=False, log_figures=False)
        trainer = L.Trainer(
            accelerator="cpu",
            devices=devices,
            strategy="ddp" if devices > 1 else "auto",
            logger=False,
            callbacks=[monitor],
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        try:
            trainer.validate(module(), loader(), verbose=False)
            results[name] = monitor.summary()["k"]
        except ValueError as error:
            results[name] = str(error)
        rank = trainer.global_rank
    torch.save(results, f"{out_dir}/padding_rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
