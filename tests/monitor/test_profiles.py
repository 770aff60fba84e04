"""Profiles along the output (``profiles=True``): the mean and mean absolute sensitivity at each output
element against closed forms, per dataloader, for the dataloaders an epoch ran, with their size bound checked
before the first training step."""

from __future__ import annotations

import importlib.util

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_sensitivity import SensitivityMonitor
from tests.helpers import (
    Decay,
    T,
    decoded,
    inputs,
    make_trainer,
    read_text_and_images,
    run_decay,
)


@pytest.mark.parametrize("method", ["auto", "reverse"])
def test_profiles_along_the_trajectory(tmp_path, method):
    x = inputs()
    monitor = SensitivityMonitor(targets=["A", "k"], profiles=True, reduction="norm", method=method)
    run_decay(tmp_path, monitor, x)
    exact = Decay().analytic(x)
    profiles = monitor.profiles()
    for label in ("A", "k"):
        assert profiles[label]["mean"].shape == (T,)
        torch.testing.assert_close(profiles[label]["mean"], exact[label].mean(0), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(profiles[label]["abs_mean"], exact[label].abs().mean(0), rtol=1e-6, atol=1e-9)
    with pytest.raises(KeyError, match="dataloader_idx=1"):
        monitor.profiles(dataloader_idx=1)


def test_profiles_per_dataloader_with_different_shapes(tmp_path):
    class TwoShapes(Decay):
        def sensitivity_step(self, batch, batch_idx, dataloader_idx=0):
            y = self(batch[0])
            return y if dataloader_idx == 0 else y[:, :2]

    x = inputs()
    monitor = SensitivityMonitor(targets=["A"], profiles=True)
    trainer = L.Trainer(
        logger=TensorBoardLogger(tmp_path), callbacks=[monitor], enable_progress_bar=False, enable_model_summary=False
    )
    loaders = [DataLoader(TensorDataset(x), batch_size=8), DataLoader(TensorDataset(x[:10]), batch_size=8)]
    trainer.validate(TwoShapes(), loaders)
    exact = Decay().analytic(x)["A"]
    torch.testing.assert_close(monitor.profiles()["A"]["mean"], exact.mean(0), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(monitor.profiles(1)["A"]["mean"], exact[:10, :2].mean(0), rtol=1e-6, atol=1e-9)
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from lightning_sensitivity._figures import pixels, profiles

    _, images = read_text_and_images(trainer.logger.log_dir)
    report = monitor._results.reports["validate"]
    for tag, idx in (("sensitivity/profiles", 0), ("sensitivity/profiles/dataloader_1", 1)):
        (image,) = images[tag]
        assert (decoded(image) == pixels(profiles(Figure, report, idx))).all(), tag
    assert "dataloader 1" in profiles(Figure, report, 1).texts[0].get_text()


def test_profiles_are_those_of_the_dataloaders_the_epoch_ran(tmp_path):
    """With ``reload_dataloaders_every_n_epochs``, an epoch without dataloader 1 has no profile of it (rather
    than the earlier epoch's, emptied to NaN) and draws none."""
    x = inputs()

    class Fewer(Decay):
        def training_step(self, batch, batch_idx):
            return 0.0 * self(batch[0]).sum()

        def train_dataloader(self):
            return DataLoader(TensorDataset(x), batch_size=8)

        def val_dataloader(self):
            loaders = [DataLoader(TensorDataset(x), batch_size=8), DataLoader(TensorDataset(2 * x[:10]), batch_size=8)]
            return loaders if self.current_epoch == 0 else loaders[:1]

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    monitor = SensitivityMonitor(targets=["A"], profiles=True)
    trainer = make_trainer(tmp_path, monitor, max_epochs=2, reload_dataloaders_every_n_epochs=1)
    trainer.fit(Fewer())
    with pytest.raises(KeyError, match=r"dataloaders \[0\]"):
        monitor.profiles(1)
    torch.testing.assert_close(monitor.profiles(0)["A"]["mean"], Decay().analytic(x)["A"].mean(0), rtol=1e-6, atol=1e-9)
    if importlib.util.find_spec("matplotlib") is not None:
        _, images = read_text_and_images(trainer.logger.log_dir)
        assert len(images["sensitivity/profiles"]) == 2 and len(images["sensitivity/profiles/dataloader_1"]) == 1


def test_profile_size_bound_is_checked_before_the_first_training_step(tmp_path):
    class Wide(Decay):
        def training_step(self, batch, batch_idx):
            raise AssertionError("no training step may run")

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    monitor = SensitivityMonitor(targets=["A", "k"], profiles=True, max_profile_elements=2 * T - 1)
    trainer = L.Trainer(
        logger=False, callbacks=[monitor], max_epochs=1, enable_progress_bar=False, enable_model_summary=False
    )
    data = DataLoader(TensorDataset(inputs()), batch_size=8)
    with pytest.raises(ValueError, match="2 targets × an output of shape \\(6,\\).*= 12.*max_profile_elements=11"):
        trainer.fit(Wide(), data, data)
