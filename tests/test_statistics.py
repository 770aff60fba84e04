"""Statistics that divide by a spread (the correlation, the standard deviation, the collinearity index) on
values without spread: an offset ``b`` with ``dy/db = 1`` everywhere has no variance, so its correlation is
undefined (NaN in its row and column), its standard deviation is 0, and rounding decides nothing."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_sensitivity import SensitivityMonitor
from lightning_sensitivity._aggregate import SensitivityAggregator, collinearity, correlation


@pytest.mark.parametrize("seed", range(8))
def test_a_constant_column_has_an_undefined_correlation_whatever_the_rounding(seed):
    torch.manual_seed(seed)
    agg = SensitivityAggregator(3)
    for _ in range(40):
        k = torch.randn(64) * 3.7 + 11.3
        agg.update(torch.stack([k, torch.full((64,), 0.1), -0.33 * k + torch.randn(64)]))
    state = agg.compute()
    r = correlation(state["products"], state["product_sum"], state["product_count"])
    assert r[1].isnan().all() and r[:, 1].isnan().all()
    kept = r[[0, 2]][:, [0, 2]]
    assert torch.isfinite(kept).all() and (kept.abs() <= 1).all()
    assert kept[0, 1] < -0.5 and kept[0, 0] == pytest.approx(1.0)
    assert state["std"][1] == 0.0 and state["std"][0] > 1.0
    assert math.isfinite(float(collinearity(state["products"])))


def test_exactly_dependent_columns_have_an_infinite_collinearity_index():
    torch.manual_seed(0)
    agg = SensitivityAggregator(3)
    for _ in range(20):
        x = torch.randn(50)
        agg.update(torch.stack([x, 3 * x, torch.randn(50)]))
    assert float(collinearity(agg.compute()["products"])) == math.inf


def test_one_value_has_no_standard_deviation():
    agg = SensitivityAggregator(1)
    agg.update(torch.tensor([[2.5]]))
    assert agg.compute()["std"].isnan().all()  # as torch.std of one element


class Logistic(L.LightningModule):
    """``y(t) = K / (1 + exp(-r (t - 5))) + b`` at 12 times per sample, each sample shifted in time."""

    def __init__(self) -> None:
        super().__init__()
        self.K = nn.Parameter(torch.tensor(2.0))
        self.r = nn.Parameter(torch.tensor(0.5))
        self.b = nn.Parameter(torch.tensor(0.1))

    def forward(self, shift: Tensor) -> Tensor:
        t = torch.linspace(0, 10, 12) + shift[:, None]
        return self.K / (1 + torch.exp(-self.r * (t - 5))) + self.b

    def training_step(self, batch, batch_idx):
        shift, y = batch
        return F.mse_loss(self(shift), y)

    def validation_step(self, batch, batch_idx):
        shift, y = batch
        self.log("val_loss", F.mse_loss(self(shift), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


def test_the_correlation_of_an_offset_is_undefined_in_a_fit(tmp_path):
    g = torch.Generator().manual_seed(0)
    shift = torch.rand(96, generator=g)
    with torch.no_grad():
        y = Logistic().eval()(shift) * 1.5 + 0.05 * torch.randn(96, 12, generator=g)
    data = TensorDataset(shift, y)
    torch.manual_seed(0)
    monitor = SensitivityMonitor(["K", "r", "b"], profiles=True, log_histograms=False, log_figures=False)
    trainer = L.Trainer(
        max_epochs=8,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor],
        default_root_dir=tmp_path,
    )
    trainer.fit(Logistic(), DataLoader(data, batch_size=16), DataLoader(data, batch_size=16))
    labels, r = monitor.correlation()
    b = labels.index("b")
    assert r[b].isnan().all() and r[:, b].isnan().all()
    others = [labels.index("K"), labels.index("r")]
    assert torch.isfinite(r[others][:, others]).all()
    summary = monitor.summary()
    assert summary["b"]["std"] == 0.0 and summary["b"]["mean"] == 1.0 and summary["K"]["std"] > 0
    assert not any(math.isinf(v) for row in summary.values() for v in row.values())
