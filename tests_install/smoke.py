"""Smoke test of an installed lightning-sensitivity, run by ``scripts/install-check.sh`` in a fresh virtual
environment, from a directory outside the checkout, as ``python -I smoke.py CHECKOUT``:

- the package imports from the environment's site-packages (not from CHECKOUT), is not an editable install,
  and its installed files hold ``py.typed`` and no tests;
- the seed problem: ``per_sample_sensitivities`` on ``y = C * x`` gives ``dy/dC == x`` exactly;
- one epoch of a ``Trainer`` with ``SensitivityMonitor`` and a ``TensorBoardLogger``: ``monitor.summary()`` has
  the target with one value per validation sample (none from the sanity check), and the event file holds its
  histogram (and, with the ``plots`` extra, its figures);
- with the ``cli`` extra, ``LightningCLI`` takes the callback by its class path.

Prints one line per check and a closing ``smoke: N passed, N failed``; exits non-zero if any failed.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import sys
import sysconfig
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

CHECKS: list[tuple[str, Callable[[], str]]] = []


def check(name: str) -> Callable[[Callable[[], str]], Callable[[], str]]:
    """Register a check, run in order by ``main``; it returns a detail to print or raises."""

    def register(fn: Callable[[], str]) -> Callable[[], str]:
        CHECKS.append((name, fn))
        return fn

    return register


def main() -> None:
    failed = []
    for name, fn in CHECKS:
        start = time.perf_counter()
        try:
            detail, ok = fn(), True
        except Exception as error:  # noqa: BLE001 - every failure is reported, then the next check runs
            traceback.print_exc()
            detail, ok = f"{type(error).__name__}: {error}", False
            failed.append(name)
        print(f"{'OK  ' if ok else 'FAIL'} {name} ({time.perf_counter() - start:.1f} s): {detail}", flush=True)
    print(f"smoke: {len(CHECKS) - len(failed)} passed, {len(failed)} failed")
    sys.exit(1 if failed else 0)


CHECKOUT = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else None


@check("imported from the environment's site-packages, not from the checkout")
def installed() -> str:
    import lightning_sensitivity

    where = Path(lightning_sensitivity.__file__).resolve()
    site = {Path(sysconfig.get_paths()[key]).resolve() for key in ("purelib", "platlib")}
    assert any(where.is_relative_to(path) for path in site), f"{where} is outside {site}"
    if CHECKOUT is not None:
        assert not where.is_relative_to(CHECKOUT), f"{where} is inside the checkout {CHECKOUT}"
        assert not Path.cwd().resolve().is_relative_to(CHECKOUT), f"run from inside the checkout {CHECKOUT}"
    # said, not asserted: whether importing the package alone loads Lightning (it should not, issue 22)
    lightning = "loads lightning" if "lightning" in sys.modules else "does not load lightning"
    return f"{where.parent}, version {lightning_sensitivity.__version__}; the import {lightning}"


@check("installed files: a regular install, py.typed, no tests")
def installed_files() -> str:
    import lightning_sensitivity

    dist = importlib.metadata.distribution("lightning-sensitivity")
    assert dist.version == lightning_sensitivity.__version__, (dist.version, lightning_sensitivity.__version__)
    direct_url = json.loads(dist.read_text("direct_url.json") or "{}")
    assert not direct_url.get("dir_info", {}).get("editable", False), f"an editable install: {direct_url}"
    files = [str(path) for path in dist.files or []]
    assert "lightning_sensitivity/py.typed" in files, "py.typed is not among the installed files"
    assert (Path(lightning_sensitivity.__file__).parent / "py.typed").is_file()
    tests = [f for f in files if f.split("/")[0] in ("tests", "tests_install", "examples", "benchmarks")]
    assert not tests, f"installed beside the package: {tests[:5]}"
    tops = sorted({f.split("/")[0] for f in files if not f.startswith(("..", "/"))})
    assert tops == ["lightning_sensitivity", f"lightning_sensitivity-{dist.version}.dist-info"], tops
    owners = importlib.metadata.packages_distributions().get("tests", [])
    assert "lightning-sensitivity" not in owners and "lightning_sensitivity" not in owners, owners
    source = direct_url.get("url", "?")
    return f"{len(files)} files from {source}"


@check("the seed problem: y = C * x gives dy/dC == x exactly")
def seed() -> str:
    import torch
    from torch import nn

    from lightning_sensitivity import per_sample_sensitivities

    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.C = nn.Parameter(torch.tensor(-5.0))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.C * x

    x = torch.arange(10.0)
    sens = per_sample_sensitivities(Scale(), "C", (x,))
    assert list(sens) == ["C"], list(sens)
    assert torch.equal(sens["C"], x), sens["C"]
    return f"dy/dC = {sens['C'].tolist()}"


def scale_module() -> type:
    """A LightningModule class for ``y = C * x``, made once lightning is imported."""
    import torch
    from lightning import LightningModule
    from torch import nn
    from torch.nn import functional as F

    class LitScale(LightningModule):
        """``y = C * x``, fitted to ``y = 2 x``."""

        def __init__(self, lr: float = 0.05) -> None:
            super().__init__()
            self.lr = lr
            self.C = nn.Parameter(torch.tensor(-5.0))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.C * x

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.mse_loss(self(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", F.mse_loss(self(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.lr)

    return LitScale


@check("one epoch of a Trainer with SensitivityMonitor and a TensorBoardLogger")
def trainer() -> str:
    import torch
    from lightning import Trainer
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_sensitivity import SensitivityMonitor

    x = torch.linspace(0.0, 1.0, 24)
    data = TensorDataset(x, 2 * x)
    monitor = SensitivityMonitor(targets="C")
    with tempfile.TemporaryDirectory() as logs, warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
        run = Trainer(
            max_epochs=1,
            accelerator="cpu",
            devices=1,
            logger=TensorBoardLogger(logs, name="smoke"),
            callbacks=[monitor],
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        run.fit(scale_module()(), DataLoader(data, batch_size=8, shuffle=True), DataLoader(data, batch_size=8))
        summary = monitor.summary()
        assert list(summary) == ["C"], list(summary)
        stats = summary["C"]
        # dy/dC = x: one value per validation sample (3 batches of 8), none from the two sanity-check batches
        assert stats["count"] == 24, stats
        assert abs(stats["mean"] - 0.5) < 1e-6 and abs(stats["abs_mean"] - 0.5) < 1e-6, stats
        assert stats["min"] == 0.0 and stats["max"] == 1.0, stats
        assert "sensitivity/C/mean" in run.callback_metrics, sorted(run.callback_metrics)
        events = EventAccumulator(run.logger.log_dir, size_guidance={"histograms": 0, "images": 0})
        events.Reload()
        tags = events.Tags()
        assert "sensitivity/C" in tags["histograms"], tags
        assert events.Histograms("sensitivity/C")[-1].histogram_value.num == 24
        figures = sorted(tag for tag in tags["images"] if tag.startswith("sensitivity/"))
        if importlib.util.find_spec("matplotlib") is not None:
            assert "sensitivity/ranking" in figures, tags["images"]
    plots = f"figures {figures}" if figures else "no figures (matplotlib not installed)"
    return f"count {stats['count']:.0f}, mean {stats['mean']:.4f}, histogram sensitivity/C written; {plots}"


@check("the cli extra: LightningCLI takes the callback by its class path")
def cli() -> str:
    if importlib.util.find_spec("jsonargparse") is None:
        return "skipped: jsonargparse is not installed (no cli extra)"
    from lightning.pytorch.cli import LightningCLI

    from lightning_sensitivity import SensitivityMonitor

    args = [
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.callbacks+=lightning_sensitivity.SensitivityMonitor",
        "--trainer.callbacks.targets=[C]",
    ]
    argv, sys.argv = sys.argv, sys.argv[:1]  # only args= reaches the parser
    try:
        parsed = LightningCLI(scale_module(), run=False, args=args, save_config_callback=None)
    finally:
        sys.argv = argv
    monitors = [c for c in parsed.trainer.callbacks if isinstance(c, SensitivityMonitor)]
    assert len(monitors) == 1, parsed.trainer.callbacks
    return f"jsonargparse {importlib.metadata.version('jsonargparse')}: {type(monitors[0]).__name__} configured"


if __name__ == "__main__":
    main()
