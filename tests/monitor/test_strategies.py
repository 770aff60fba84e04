"""Strategies checked in ``setup``: those that run the monitor on copies of itself in other processes warn
that this one is not updated; DeepSpeed and FSDP1 are refused (the multi-process runs are in ``end_to_end``)."""

from __future__ import annotations

import pickle
import warnings

import lightning as L
import pytest
import torch

from lightning_sensitivity import SensitivityMonitor
from tests.helpers import Physics, loaders, trainer


@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp_notebook", "ddp"])
def test_strategies_that_start_processes_from_this_one_warn_that_this_monitor_is_not_updated(strategy):
    """With ``ddp_spawn`` (``ddp_fork``, ``ddp_notebook``) the monitor runs on copies of itself in other
    processes: the object the script holds is never updated, so reading it is announced in ``setup``."""
    t = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, logger=False, enable_progress_bar=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        SensitivityMonitor(targets="C", log_histograms=False).setup(t, Physics(), "fit")
    spawned = [w for w in caught if "strategy='ddp'" in str(w.message)]
    assert len(spawned) == (strategy != "ddp"), [str(w.message) for w in caught]


def _strategy(name: str):
    return type(name, (L.pytorch.strategies.SingleDeviceStrategy,), {})(device=torch.device("cpu"))


@pytest.mark.parametrize("name", ["DeepSpeedStrategy", "FSDPStrategy"])
def test_unsupported_strategies_are_refused_in_setup(name):
    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.k = torch.nn.Parameter(torch.tensor([1.0]))

    trainer = L.Trainer(strategy=_strategy(name), logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=f"{name}.*not supported.*ModelParallelStrategy"):
        SensitivityMonitor(targets="k[0]").setup(trainer, Tiny(), "fit")


def test_the_monitor_pickles_before_and_after_a_run(tmp_path):
    """``ddp_spawn`` pickles the Trainer with its callbacks into each process, at every ``fit``: the monitor
    pickles, with what it learned of modules (plans) left behind and its results kept."""
    monitor = SensitivityMonitor(["C", "net.0.weight[1, 0]"], profiles=True)
    pickle.loads(pickle.dumps(monitor))
    train, val = loaders()
    trainer(tmp_path, monitor).fit(Physics(), train, val)
    copy = pickle.loads(pickle.dumps(monitor))
    assert copy.labels == monitor.labels
    for label, stats in monitor.summary().items():
        assert copy.summary()[label] == pytest.approx(stats, nan_ok=True), label
