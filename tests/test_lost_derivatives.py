"""A derivative that AD lost while the output moves with the target (``x * k.item()``) is never logged as zeros:
``verify=True`` and ``verify=False`` raise, ``verify="warn"`` warns once per target and logs NaN."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from conftest import read_events
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_sensitivity import SensitivityCheckError, SensitivityMonitor


class ThroughItem(L.LightningModule):
    """``y = x * k.item() + c * x``: ``k`` reaches the output through a Python number, which carries no tangent."""

    def __init__(self) -> None:
        super().__init__()
        self.k = nn.Parameter(torch.tensor(1.3))
        self.c = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.k.item() + self.c * x

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def run(tmp_path, monitor: SensitivityMonitor, fn: str = "fit") -> L.Trainer:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(24, 3, generator=g) + 0.5, torch.randn(24, 3, generator=g))
    trainer = L.Trainer(
        max_epochs=2,
        limit_train_batches=2,
        logger=TensorBoardLogger(tmp_path, name="tb"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor],
    )
    loader = DataLoader(data, batch_size=8)
    if fn == "fit":
        trainer.fit(ThroughItem(), loader, loader)
    else:
        trainer.validate(ThroughItem(), loader)
    return trainer


@pytest.mark.parametrize("fn", ["fit", "validate"])
def test_warn_logs_a_lost_derivative_as_nan_and_warns_once(tmp_path, fn):
    monitor = SensitivityMonitor(["k", "c"], verify="warn", log_figures=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = run(tmp_path, monitor, fn)
    lost = [w for w in caught if "'k'" in str(w.message) and "NaN" in str(w.message)]
    assert len(lost) == 1, [str(w.message) for w in caught]
    assert "'c'" not in str(lost[0].message)
    summary = monitor.summary()
    assert summary["k"]["count"] == 0 and summary["k"]["nonfinite"] == 24 * 3
    x = trainer.val_dataloaders.dataset.tensors[0]  # dy/dc = x
    assert summary["c"]["nonfinite"] == 0 and summary["c"]["count"] == 24 * 3
    assert summary["c"]["mean"] == pytest.approx(float(x.double().mean()), rel=1e-6)
    _, scalars = read_events(trainer.logger.log_dir)
    assert [e.value for e in scalars["sensitivity/k/nonfinite"]] == [72.0] * len(scalars["sensitivity/k/nonfinite"])


@pytest.mark.parametrize("verify", [True, False])
def test_error_and_off_raise_on_a_lost_derivative(tmp_path, verify):
    with pytest.raises(SensitivityCheckError, match="'k'"):
        run(tmp_path, SensitivityMonitor(["k", "c"], verify=verify, log_figures=False))
