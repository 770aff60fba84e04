"""What the monitor differentiates by default: the step's own call of the module with the batch's input first,
with every argument the step passed (``self(t, y0)``), not ``self(t)`` at a default ``y0``; a warning where the
step never calls the module with the batch's input; and an error from inside the model in that call that says
which call was made and what to do."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_sensitivity._fused as fused_module
from lightning_sensitivity import SensitivityMonitor
from tests.helpers import loop_reference


class Decay(L.LightningModule):
    """``y(t) = y0 exp(-k t) + b``, with ``y0 = 1`` where none is given."""

    def __init__(self, keyword: bool = False) -> None:
        super().__init__()
        self.k = nn.Parameter(torch.tensor(0.7))
        self.b = nn.Parameter(torch.tensor(0.1))
        self.keyword = keyword

    def forward(self, t: Tensor, y0: Tensor | None = None) -> Tensor:
        y0 = torch.ones_like(t[:, :1]) if y0 is None else y0
        return y0 * torch.exp(-self.k * t) + self.b

    def _call(self, batch):
        t, y0, y = batch
        return (self(t, y0=y0) if self.keyword else self(t, y0)), y

    def training_step(self, batch, batch_idx):
        out, y = self._call(batch)
        return (out - y).square().mean()

    def validation_step(self, batch, batch_idx):
        out, y = self._call(batch)
        self.log("val_loss", (out - y).square().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    t = torch.rand(24, 5, generator=g) * 3
    y0 = torch.rand(24, 1, generator=g) * 0.5 + 0.2  # far from the default y0 = 1
    return TensorDataset(t, y0, torch.rand(24, 5, generator=g))


def run(fn: str, model: L.LightningModule, monitors: list, tmp_path) -> None:
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=monitors,
        default_root_dir=tmp_path,
    )
    loader = DataLoader(data(), batch_size=8)
    if fn == "fit":
        trainer.fit(model, loader, loader)
    else:
        trainer.validate(model, loader)


@pytest.mark.parametrize("take_over", [True, False], ids=["taken-over", "after-the-step"])
@pytest.mark.parametrize("keyword", [False, True], ids=["positional", "keyword"])
@pytest.mark.parametrize("fn", ["fit", "validate"])
def test_the_steps_call_with_more_arguments_is_differentiated(tmp_path, monkeypatch, fn, keyword, take_over):
    if not take_over:
        monkeypatch.setattr(fused_module, "can_fuse", lambda module: False)
    torch.manual_seed(0)
    model = Decay(keyword)
    monitors = [SensitivityMonitor(["k", "b"], log_histograms=False, log_figures=False)]
    monitors.append(SensitivityMonitor(["k"], prefix="second", log_histograms=False, log_figures=False))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*never with the batch's input.*")
        run(fn, model, monitors, tmp_path)
    t, y0, _ = data().tensors
    expected = loop_reference(model.eval(), ["k"], (t, y0))["k"].double()
    for monitor in monitors:
        summary = monitor.summary()
        assert summary["k"]["count"] == t.numel()
        assert summary["k"]["mean"] == pytest.approx(float(expected.mean()), rel=1e-5)
        assert summary["k"]["abs_mean"] == pytest.approx(float(expected.abs().mean()), rel=1e-5)
    at_default = loop_reference(model, ["k"], (t,))["k"].double()
    assert abs(float(at_default.mean()) - float(expected.mean())) > 0.1  # the two calls differ


class OtherInput(Decay):
    """A step that calls the module on a transformed input, never on the batch's own."""

    def _call(self, batch):
        t, y0, y = batch
        return self(t * 2.0, y0), y


def test_a_step_that_never_calls_the_module_with_the_batchs_input_is_warned_about(tmp_path):
    monitor = SensitivityMonitor(["k"], log_histograms=False, log_figures=False)
    with pytest.warns(
        UserWarning, match=r"the step called OtherInput\(Tensor\[8, 5\], Tensor\[8, 1\]\).*sensitivity_step"
    ):
        run("validate", OtherInput(), [monitor], tmp_path)
    assert monitor.summary()["k"]["count"] == 24 * 5  # the default call, as documented


class Descriptors(L.LightningModule):
    """A forward that takes extra descriptors and fails inside without them (chemprop's ``X_d``), called by a
    step that never passes the batch's input first."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(5, 1)

    def forward(self, x: Tensor, extra: Tensor | None = None) -> Tensor:
        extra = torch.zeros(x.shape[0], 3) if extra is None else extra
        return self.head(torch.cat([x, extra], dim=1))  # 2 + 3 features; 2 alone is a shape error inside

    def validation_step(self, batch, batch_idx):
        x, extra, _ = batch
        self.log("val", self.head(torch.cat([x[:, :2], extra[:, :3]], 1)).mean())


def test_a_default_call_that_fails_inside_the_model_says_which_call_and_what_to_do(tmp_path):
    g = torch.Generator().manual_seed(0)
    loader = DataLoader(
        TensorDataset(torch.randn(8, 4, generator=g), torch.randn(8, 3, generator=g), torch.randn(8)), batch_size=4
    )
    trainer = L.Trainer(
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[SensitivityMonitor(["head.bias[0]"], log_figures=False)],
    )
    with pytest.raises(
        RuntimeError,
        match=r"default call Descriptors\(Tensor\[4, 4\]\) failed inside the model: RuntimeError: .*sensitivity_step",
    ):
        trainer.validate(Descriptors(), loader)
