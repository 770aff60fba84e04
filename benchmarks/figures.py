"""The cost of one logged epoch's figures (ranking, correlation, a profile per target) for TensorBoard.

    python benchmarks/figures.py            # K = 1 and 16 targets, medians of 9 interleaved runs
    python benchmarks/figures.py --quick    # 3 runs

"first epoch" builds every figure; "later epochs" redraws the figures kept from the epoch before with the new
numbers, as the monitor does from its second logged epoch on. Times are the CPU time of the thread that draws
(``time.thread_time``), so that other jobs on a shared machine disturb them less than they do wall-clock
time; they include rendering, PNG encoding and writing the event file. The report is synthetic: its numbers do
not change what is drawn, only where.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import matplotlib
import torch
from torch.utils.tensorboard import SummaryWriter

from lightning_sensitivity._figures import _draw
from lightning_sensitivity._report import Report
from lightning_sensitivity._sinks import TensorBoardSink


def report(k: int, outputs: int = 8) -> Report:
    """``k`` targets named like elements of a weight matrix, profiles over ``outputs`` output elements."""
    g = torch.Generator().manual_seed(0)
    labels = [f"net.2.weight[{i}, {7 * i}]" for i in range(k)]
    stats = {
        label: {"count": 8192, "nonfinite": 0, "mean": 0.1 * i, "std": 0.2, "abs_mean": 0.3 + i,
                "mean_square": 1.0, "min": -1.0, "max": 1.0, "rank": i + 1}
        for i, label in enumerate(labels)
    }  # fmt: skip
    corr = torch.corrcoef(torch.randn(k, 64, generator=g, dtype=torch.float64)) if k > 1 else torch.ones(1, 1)
    profiles = {
        label: {"mean": torch.randn(outputs, generator=g), "abs_mean": torch.rand(outputs, generator=g)}
        for label in labels
    }
    return Report(1, labels, stats, corr.double(), 1.0, [], {0: profiles})


class Logger:  # what TensorBoardSink reads of Lightning's TensorBoardLogger
    def __init__(self) -> None:
        self.experiment = SummaryWriter(tempfile.mkdtemp())


def cpu_ms(runs: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median CPU milliseconds of each run, the runs interleaved."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():  # warm-up: matplotlib's caches of fonts and text extents
        run()
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.thread_time()
            run()
            times[name].append(time.thread_time() - start)
    return {name: 1e3 * statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeats = 3 if args.quick else 9
    sink = TensorBoardSink(Logger())
    print(f"matplotlib {matplotlib.__version__}, torch {torch.__version__}")
    print("\n| K | figures | first epoch, ms CPU | later epochs, ms CPU | later / first |")
    print("|---|---|---|---|---|")
    for k in (1, 16):
        epoch = report(k)
        kept: dict = {}
        ms = cpu_ms(
            {
                "first": lambda epoch=epoch: _draw("sensitivity", epoch, [(sink.figure, False)], {}),
                "later": lambda epoch=epoch, kept=kept: _draw("sensitivity", epoch, [(sink.figure, False)], kept),
            },
            repeats,
        )
        print(f"| {k} | {2 + k} | {ms['first']:.0f} | {ms['later']:.0f} | {ms['later'] / ms['first']:.2f} |")


if __name__ == "__main__":
    main()
