"""A classifier whose sensitivities are defined by ``sensitivity_step``, with dict batches.

    python examples/classifier/train.py fit --config examples/classifier/config.yaml

The model is a small MLP followed by a softmax with a learnable temperature ``T``. ``sensitivity_step``
returns the probability the model gives to the true class, so the monitor logs, per validation sample,
d p(true class) / d T and d p(true class) / d (one weight element). The data are Gaussian blobs made here.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset


class Blobs(Dataset):
    """``n`` points in ``features`` dimensions around ``classes`` random centres; items are dicts."""

    def __init__(self, n: int, classes: int, features: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        centres = 2.0 * torch.randn(classes, features, generator=torch.Generator().manual_seed(1234))
        self.y = torch.randint(0, classes, (n,), generator=g)
        self.x = centres[self.y] + torch.randn(n, features, generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"x": self.x[i], "y": self.y[i]}


class BlobData(L.LightningDataModule):
    """Train and validation blobs.

    Args:
        n_train: training samples.
        n_val: validation samples.
        classes: number of classes.
        features: input dimension.
        batch_size: samples per batch.
    """

    def __init__(
        self, n_train: int = 2048, n_val: int = 512, classes: int = 4, features: int = 8, batch_size: int = 128
    ) -> None:
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str) -> None:
        h = self.hparams
        self.train_set = Blobs(h.n_train, h.classes, h.features, seed=0)
        self.val_set = Blobs(h.n_val, h.classes, h.features, seed=1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size)


class TemperatureClassifier(L.LightningModule):
    """MLP + softmax with a learnable temperature.

    Args:
        features: input dimension.
        classes: number of classes.
        hidden: hidden width.
        lr: learning rate.
    """

    def __init__(self, features: int = 8, classes: int = 4, hidden: int = 32, lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))
        self.T = nn.Parameter(torch.tensor(1.0))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x) / self.T

    def sensitivity_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """``# batch['x'] [B, F], batch['y'] [B] -> p(true class) [B]``"""
        probs = self(batch["x"]).softmax(dim=-1)
        return probs.gather(1, batch["y"][:, None]).squeeze(1)

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self(batch["x"]), batch["y"])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        logits = self(batch["x"])
        self.log("val_loss", F.cross_entropy(logits, batch["y"]))
        self.log("val_acc", (logits.argmax(-1) == batch["y"]).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main(args=None) -> None:
    LightningCLI(TemperatureClassifier, BlobData, args=args)


if __name__ == "__main__":
    main()
