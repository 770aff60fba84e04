"""The model is left as it was: every Parameter and buffer object in its place, bit for bit, after every way the
engine evaluates it, also where one module object is registered under two names."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import central_differences
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_sensitivity import SensitivityMonitor, per_sample_sensitivities


def snapshot(module: nn.Module) -> list[tuple[str, Tensor, Tensor]]:
    """Every slot's name, the tensor object in it and a copy of its value (tied and repeated names included)."""
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    return [(name, tensor, tensor.detach().clone()) for name, tensor in named]


def assert_untouched(module: nn.Module, before: list[tuple[str, Tensor, Tensor]]) -> None:
    now = dict([*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)])
    assert list(now) == [name for name, _, _ in before]
    for name, tensor, value in before:
        assert now[name] is tensor, f"{name} holds another tensor object"
        assert type(now[name]) is type(tensor), name
        assert torch.equal(now[name].detach(), value), f"{name} changed value"


class Twice(nn.Module):
    """One Linear registered as ``a`` and ``b`` (pytorch-forecasting's N-BEATS with shared thetas), and one
    BatchNorm as ``bn`` and ``norm``; ``unused`` reaches nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.a = self.b = nn.Linear(3, 2)
        self.bn = self.norm = nn.BatchNorm1d(2)
        self.unused = nn.Parameter(torch.tensor([0.5]))
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.norm(self.a(x))) + self.b(x).square()


CASES = [["a.weight[0, 1]"], ["a.weight[0, 1]", "b.bias[1]", "norm.running_mean[0]"], ["b.bias[0]", "unused[0]"]]


@pytest.mark.parametrize("method", ["auto", "forward", "reverse"])
@pytest.mark.parametrize("verify", [False, True])
@pytest.mark.parametrize("targets", CASES, ids=["one", "several", "unused"])
def test_a_module_under_two_names_is_left_in_place(targets, verify, method):
    torch.manual_seed(0)
    model = Twice().double().eval()
    x = torch.randn(5, 3, dtype=torch.float64)
    before = snapshot(model)
    sens = per_sample_sensitivities(model, targets, (x,), method=method, verify=verify)
    assert_untouched(model, before)
    for label, value in sens.items():
        torch.testing.assert_close(value, central_differences(model, label, x), rtol=1e-6, atol=1e-8)
    assert_untouched(model, before)


@pytest.mark.parametrize("chunk_size", [None, 1])
def test_chunks_and_inference_mode_leave_a_module_under_two_names_in_place(chunk_size):
    torch.manual_seed(0)
    model = Twice().eval()
    before = snapshot(model)
    with torch.inference_mode():
        per_sample_sensitivities(model, CASES[1], (torch.randn(4, 3),), chunk_size=chunk_size, verify=True)
    assert_untouched(model, before)
    model.cpu()  # Lightning's teardown: raised on a leftover functorch-wrapped tensor
    assert_untouched(model, before)


class SharedThetas(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.theta_b = self.theta_f = nn.Linear(4, 3)
        self.head = nn.Linear(3, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.theta_b(x)) + self.theta_f(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


def _fit(callbacks: list, tmp_path) -> SharedThetas:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(48, 4, generator=g), torch.randn(48, 1, generator=g))
    torch.manual_seed(0)
    model = SharedThetas()
    trainer = L.Trainer(
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, DataLoader(data, batch_size=16), DataLoader(data, batch_size=16))
    return model


@pytest.mark.parametrize("targets", [["theta_f.weight[0, 1]"], ["theta_b.weight[0, 1]", "theta_f.bias[2]"]])
def test_a_fit_trains_bit_for_bit_as_without_the_monitor(tmp_path, targets):
    plain = _fit([], tmp_path / "plain")
    monitor = SensitivityMonitor(targets, log_histograms=False, log_figures=False)
    watched = _fit([monitor], tmp_path / "watched")
    assert isinstance(watched.theta_f.weight, nn.Parameter) and watched.theta_f is watched.theta_b
    for (name, a), (_, b) in zip(plain.state_dict().items(), watched.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert monitor.summary()[targets[0]]["count"] > 0
