"""Loggers: without TensorBoard one warning and the scalars still logged; CSV; Weights & Biases (offline, read
back from its run file) and MLflow (a local file store, read back from its artifacts); and the loggers of the
standalone ``pytorch_lightning`` package."""

from __future__ import annotations

import json
import struct
import time
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sensitivity import SensitivityMonitor
from tests.helpers import (
    Decay,
    Physics,
    assert_histogram,
    expected_stats,
    inputs,
    physics_data,
    read_events,
    run_decay,
    trainer,
)


@pytest.mark.parametrize("logger", ["csv", "none"])
def test_without_tensorboard_one_warning_and_scalars_still_logged(tmp_path, logger):
    logger = CSVLogger(tmp_path) if logger == "csv" else False
    data = DataLoader(physics_data(16), batch_size=8)
    t = trainer(tmp_path, SensitivityMonitor(targets=["C"]), logger=logger, max_epochs=2)
    with pytest.warns(UserWarning, match="no TensorBoard, W&B or MLflow logger") as record:
        t.fit(Physics(), data, data)
    assert len([w for w in record if "TensorBoardLogger" in str(w.message)]) == 1
    expected = expected_stats(physics_data(16).tensors[0][:, :1].expand(-1, 3))
    assert t.callback_metrics["sensitivity/C/mean"].item() == pytest.approx(expected["mean"], rel=1e-5)
    if logger:
        assert "sensitivity/C/abs_mean" in (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        SensitivityMonitor(targets=["C"], log_histograms=False, prefix="other").setup(t, Physics(), "fit")


def test_new_statistics_reach_every_logger(tmp_path):
    monitor = SensitivityMonitor(targets=["A", "k"], log_histograms=False)
    run_decay(tmp_path, monitor, logger=CSVLogger(tmp_path))
    text = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "sensitivity/A/mean_square" in text and "sensitivity/collinearity" in text


def wandb_history(root: Path, timeout: float = 60.0) -> list[dict[str, object]]:
    """Every history row of the offline runs under ``root``, once each run's file holds its exit record (W&B's
    service writes it after ``finish()`` returns)."""
    deadline = time.monotonic() + timeout
    while True:
        rows, finished = _wandb_records(root)
        if finished or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def _wandb_records(root: Path) -> tuple[list[dict[str, object]], bool]:
    """History rows and whether every run has exited, read from the ``.wandb`` files (a LevelDB-style log of
    protobuf records: a 7-byte header, then 32 KiB blocks of checksum, length, type and payload)."""
    from wandb.proto import wandb_internal_pb2

    rows, exits, runs = [], 0, 0
    for path in sorted(root.rglob("run-*.wandb")):
        runs += 1
        data, pos, pending = path.read_bytes(), 7, b""
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            if left < 7 or (length == 0 and kind == 0):
                pos += left
                continue
            chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
            pending = chunk if kind in (1, 2) else pending + chunk
            if kind not in (1, 4):
                continue
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            kind_of = record.WhichOneof("record_type")
            exits += kind_of == "exit"
            if kind_of == "history":
                items = record.history.item
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items})
    return rows, runs > 0 and exits == runs


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch) -> None:
    """W&B offline and silent, every file of it under ``tmp_path``."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))


class Spread(L.LightningModule):
    """``y = C * x`` with ``x`` spread over 2^-100 .. 2^100: the histogram has far more than 512 buckets."""

    def __init__(self):
        super().__init__()
        self.C = nn.Parameter(torch.tensor(1.0, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        return self.C * x

    def validation_step(self, batch, batch_idx):
        self.log("val", self(batch[0]).mean())


def test_wandb_histograms_table_and_figures_offline(tmp_path, offline_wandb):
    from lightning.pytorch.loggers import WandbLogger

    x = torch.exp2(torch.linspace(-100, 100, 2000, dtype=torch.float64)).reshape(-1, 1)
    x[::2] *= -1
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="sensitivity-test")
    monitor = SensitivityMonitor(targets="C", log_figures=True)
    trainer = L.Trainer(logger=logger, callbacks=[monitor], enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(Spread(), DataLoader(TensorDataset(x), batch_size=500))
    logger.experiment.finish()
    rows = wandb_history(tmp_path)
    (histogram,) = [row for row in rows if "sensitivity/C/_type" in row]
    assert histogram["sensitivity/C/_type"] == "histogram"
    counts, bins = histogram["sensitivity/C/values"], histogram["sensitivity/C/bins"]
    assert 100 < len(counts) <= 512 and len(bins) == len(counts) + 1
    assert sum(counts) == 2000  # exact after merging neighbours
    assert bins == sorted(bins) and bins[0] <= float(x.min()) and bins[-1] >= float(x.max())
    stats = expected_stats(x)
    assert monitor.summary()["C"]["mean"] == pytest.approx(stats["mean"], rel=1e-9, abs=1e-12)
    assert any(row.get("sensitivity/summary/_type") == "table-file" for row in rows)
    pytest.importorskip("matplotlib")
    assert any(row.get("sensitivity/ranking/_type") == "image-file" for row in rows)


def test_mlflow_table_and_figures_as_artifacts(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    pytest.importorskip("matplotlib")
    from lightning.pytorch.loggers import MLFlowLogger

    logger = MLFlowLogger(experiment_name="sensitivity", tracking_uri=f"file:{tmp_path / 'mlruns'}")
    monitor = SensitivityMonitor(targets=["A", "k"], profiles=True)
    trainer = L.Trainer(logger=logger, callbacks=[monitor], enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(Decay(), DataLoader(TensorDataset(inputs()), batch_size=8))
    artifacts = tmp_path / "mlruns"
    found = {p.relative_to(next(artifacts.rglob("artifacts"))).as_posix() for p in artifacts.rglob("step_*")}
    for name in (
        "sensitivity/summary/step_00000000.md",
        "sensitivity/ranking/step_00000000.png",
        "sensitivity/correlation/step_00000000.png",
        "sensitivity/histograms/step_00000000.png",
        "sensitivity/profiles/step_00000000.png",
    ):
        assert name in found, (name, sorted(found))
    table = next(artifacts.rglob("sensitivity/summary/step_00000000.md")).read_text()
    assert "`A`" in table and "`k`" in table
    metrics = {p.name for p in artifacts.rglob("metrics/sensitivity/*/*")} | {
        p.name for p in artifacts.rglob("metrics/sensitivity/*")
    }
    assert "mean_square" in metrics and "collinearity" in metrics


def test_standalone_pytorch_lightning_trainer_and_logger(tmp_path):
    pl = pytest.importorskip("pytorch_lightning")

    class Standalone(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.C = nn.Parameter(torch.tensor(-5.0))

        def forward(self, x):
            return self.C * x

        def training_step(self, batch, batch_idx):
            return (self(batch[0]) ** 2).mean()

        def validation_step(self, batch, batch_idx):
            self.log("val", self(batch[0]).mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    x = torch.randn(12, 2)
    t = pl.Trainer(
        max_epochs=1,
        logger=pl.loggers.TensorBoardLogger(tmp_path, name="pl"),
        callbacks=[SensitivityMonitor(targets="C")],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("error", ".*TensorBoardLogger.*")
        t.fit(Standalone(), DataLoader(TensorDataset(x), batch_size=4), DataLoader(TensorDataset(x), batch_size=4))
    histograms, scalars = read_events(t.logger.log_dir)
    assert_histogram(histograms["sensitivity/C"][0], expected_stats(x))
    assert scalars["sensitivity/C/mean"][0].value == pytest.approx(float(x.mean()), rel=1e-5)


def test_standalone_package_test_stage_on_offline_wandb(tmp_path, offline_wandb):
    """``trainer.test`` of the standalone ``pytorch_lightning`` package, with its offline ``WandbLogger``: the
    test stage's histograms and table reach W&B under ``sensitivity_test/``."""
    pl = pytest.importorskip("pytorch_lightning")

    class Standalone(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.C = nn.Parameter(torch.tensor(2.0, dtype=torch.float64))

        def forward(self, x: Tensor) -> Tensor:
            return self.C * x

        def test_step(self, batch, batch_idx):
            self.log("test", self(batch[0]).mean())

    x = torch.linspace(-3, 5, 60, dtype=torch.float64).reshape(-1, 2)
    logger = pl.loggers.WandbLogger(offline=True, save_dir=str(tmp_path), project="sensitivity-test")
    monitor = SensitivityMonitor(targets="C", stages=("test",), log_figures=False)
    trainer = pl.Trainer(logger=logger, callbacks=[monitor], enable_progress_bar=False, enable_model_summary=False)
    trainer.test(Standalone(), DataLoader(TensorDataset(x), batch_size=8))
    logger.experiment.finish()
    rows = wandb_history(tmp_path)
    (histogram,) = [row for row in rows if "sensitivity_test/C/_type" in row]
    assert histogram["sensitivity_test/C/_type"] == "histogram"
    assert sum(histogram["sensitivity_test/C/values"]) == x.numel()  # d(C x)/dC = x, every value once
    assert any(row.get("sensitivity_test/summary/_type") == "table-file" for row in rows)
    assert not any(key.startswith("sensitivity/") for row in rows for key in row)  # never the validation tags
    assert trainer.callback_metrics["sensitivity_test/C/mean"] == pytest.approx(float(x.mean()))
    assert monitor.summary()["C"]["count"] == x.numel()
