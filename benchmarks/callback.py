"""The cost of SensitivityMonitor inside a Trainer: one validation epoch with and without it.

    python benchmarks/callback.py            # 8192 samples, batch 512, medians of 7 interleaved runs
    python benchmarks/callback.py --quick    # 3 runs

Configurations, each against the same Trainer without the monitor:
- ``default``: the monitor as it comes (statistics, histograms, the ranked table; figures off here, since
  they are drawn in a background thread whose cost a one-epoch ``trainer.validate`` cannot hide);
- ``analysis``: everything that streams per batch on: ``normalize="relative"``, ``profiles=True`` (and the
  correlation, which is always on);
- ``figures``: ``analysis`` plus the matplotlib figures, waited for before ``validate`` returns.
Model: the MLP 64 -> 512 -> 512 -> 8 (tanh) of ``benchmarks/engine.py``; targets are elements of its middle
weight matrix. Ratios are what count; absolute times on a shared 2-core machine are noisy.
"""

from __future__ import annotations

import argparse
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

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self(batch[0]).square().mean())


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
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=512)
    args = parser.parse_args()
    repeats = 3 if args.quick else 7
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(args.samples, 64)), batch_size=args.batch)
    model = Net()

    def validate(callbacks: list) -> None:
        trainer = L.Trainer(
            logger=L.pytorch.loggers.TensorBoardLogger(tempfile.mkdtemp()),
            callbacks=callbacks,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.validate(model, data, verbose=False)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"\n## Callback overhead: one validation epoch, {args.samples} samples, batch {args.batch} (validate)")
    print("| K | without | " + " | ".join(CONFIGS) + " | " + " | ".join(f"{c} / without" for c in CONFIGS) + " |")
    print("|---|---|" + "---|" * (2 * len(CONFIGS)))
    for k in (1, 16):
        runs: dict[str, Callable[[], None]] = {"without": lambda: validate([])}
        for name, options in CONFIGS.items():
            runs[name] = lambda options=options: validate([SensitivityMonitor(targets(k), **options)])
        med = interleaved(runs, repeats)
        times = " | ".join(f"{med[c]:.3f} s" for c in CONFIGS)
        ratios = " | ".join(f"{med[c] / med['without']:.2f}" for c in CONFIGS)
        print(f"| {k} | {med['without']:.3f} s | {times} | {ratios} |")


if __name__ == "__main__":
    main()
