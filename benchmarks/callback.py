"""The cost of SensitivityMonitor inside a Trainer: validation (and a short fit) with and without it.

    python benchmarks/callback.py            # 12288 samples, batch 512, medians of 7 interleaved runs
    python benchmarks/callback.py --quick    # 3 runs
    python benchmarks/callback.py --k 16     # one number of targets

Configurations, each against the same Trainer without the monitor:
- ``default``: the monitor as it comes (verification on the first batch, statistics, histograms, the ranked
  table), figures off: what scales with the data;
- ``analysis``: everything that streams per batch on: ``normalize="relative"``, ``profiles=True`` (and the
  correlation, which is always on);
- ``figures``: everything on: ``analysis`` plus the matplotlib figures (ranking, correlation, profiles).
  ``trainer.validate`` waits for them before it returns, so they are a fixed cost per logged epoch (independent
  of the number of samples) that a one-epoch validation cannot hide; in ``fit`` they are drawn in a background
  thread while training goes on, which the second table measures (three epochs of training and validation).
``figures / analysis`` is what the figures cost against the same monitor with figures off. The 12288 samples
make an epoch of training and validation with the monitor (figures off) about a second on a 2-core machine;
the "epoch" column gives it. Model: the MLP 64 -> 512 -> 512 -> 8 (tanh) of ``benchmarks/engine.py``; targets
are elements of its middle weight matrix. Ratios are what count; absolute times on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import logging
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sensitivity import SensitivityMonitor


class Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return self(batch[0]).square().mean()

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self(batch[0]).square().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def targets(k: int) -> list[str]:
    return [f"net.2.weight[{i % 512}, {(7 * i) % 512}]" for i in range(k)]


CONFIGS: dict[str, dict] = {
    "default": {"log_figures": False},
    "analysis": {"log_figures": False, "normalize": "relative", "profiles": True},
    "figures": {"log_figures": True, "normalize": "relative", "profiles": True},
}


def interleaved(runs: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():  # warm-up
        run()
    for _ in range(repeats):
        for name, run in runs.items():
            gc.collect()  # the garbage of the run before (figures are cycles of many objects) is not this run's cost
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--samples", type=int, default=12288)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--k", type=int, nargs="+", default=[1, 16], help="numbers of targets")
    args = parser.parse_args()
    repeats = 3 if args.quick else 7
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)  # no "GPU available" lines per Trainer
    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(args.samples, 64)), batch_size=args.batch)
    model = Net()

    def trainer(callbacks: list) -> L.Trainer:
        return L.Trainer(
            logger=L.pytorch.loggers.TensorBoardLogger(tempfile.mkdtemp()),
            callbacks=callbacks,
            max_epochs=3,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            num_sanity_val_steps=0,
        )

    def validate(callbacks: list) -> None:
        trainer(callbacks).validate(model, data, verbose=False)

    def fit(callbacks: list) -> None:
        trainer(callbacks).fit(Net(), data, data)

    print(
        f"{datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )
    tables = (
        (validate, 1, f"one validation epoch, {args.samples} samples, batch {args.batch} (`trainer.validate`)"),
        (
            fit,
            3,
            f"three epochs of training and validation on {args.samples} samples, batch {args.batch} (`trainer.fit`)",
        ),
    )
    for run_trainer, epochs, title in tables:
        print(f"\n## Callback overhead: {title}")
        print(
            "| K | epoch (analysis) | without | " + " | ".join(CONFIGS) + " | "
            + " | ".join(f"{c} / without" for c in CONFIGS) + " | figures / analysis |"
        )  # fmt: skip
        print("|---|---|---|" + "---|" * (2 * len(CONFIGS) + 1))
        for k in args.k:
            runs: dict[str, Callable[[], None]] = {"without": lambda run_trainer=run_trainer: run_trainer([])}
            for name, options in CONFIGS.items():
                runs[name] = lambda options=options, run_trainer=run_trainer, k=k: run_trainer(
                    [SensitivityMonitor(targets(k), **options)]
                )
            med = interleaved(runs, repeats)
            times = " | ".join(f"{med[c]:.3f} s" for c in CONFIGS)
            ratios = " | ".join(f"{med[c] / med['without']:.2f}" for c in CONFIGS)
            epoch = med["analysis"] / epochs
            print(
                f"| {k} | {epoch:.2f} s | {med['without']:.3f} s | {times} | {ratios} "
                f"| {med['figures'] / med['analysis']:.2f} |"
            )


if __name__ == "__main__":
    main()
