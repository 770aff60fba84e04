"""The cost of one logged epoch's figures (ranking, correlation, profiles) for TensorBoard, for K targets.

    python benchmarks/figures.py            # K = 1, 16, 1000; medians of 9 interleaved runs
    python benchmarks/figures.py --quick    # 3 runs

"first epoch" builds every figure; "later epochs" redraws the figures kept from the epoch before with the new
numbers, as the monitor does from its second logged epoch on. Times are the CPU time of the thread that draws
(``time.thread_time``), so that other jobs on a shared machine disturb them less than they do wall-clock
time; they include rendering, PNG encoding and writing the event file. "texts" counts the texts drawn, "pixels"
the largest canvas; "peak RSS" is how much the process's peak resident memory grew while drawing K targets
(K in increasing order, so it is what this K adds to the smaller ones). The report is synthetic: its numbers do
not change what is drawn, only where.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from collections.abc import Callable

import matplotlib
import torch
from matplotlib.figure import Figure
from matplotlib.text import Text
from torch.utils.tensorboard import SummaryWriter

from lightning_sensitivity._figures import _draw, correlation, profiles, ranking
from lightning_sensitivity._report import Report
from lightning_sensitivity._sinks import TensorBoardSink


def report(k: int, outputs: int = 8) -> Report:
    """``k`` targets named like elements of a weight matrix, profiles over ``outputs`` output elements."""
    g = torch.Generator().manual_seed(0)
    labels = [f"net.2.weight[{i // 512}, {i % 512}]" for i in range(k)]
    stats = {
        label: {"count": 8192, "nonfinite": 0, "mean": 0.1 * i, "std": 0.2, "abs_mean": 0.3 + i,
                "mean_square": 1.0, "min": -1.0, "max": 1.0, "rank": k - i}
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


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeats = 3 if args.quick else 9
    sink = TensorBoardSink(Logger())
    print(f"matplotlib {matplotlib.__version__}, torch {torch.__version__}")
    print("\n| K | figures | texts | largest canvas | first epoch, ms CPU | later epochs, ms CPU | peak RSS added |")
    print("|---|---|---|---|---|---|---|")
    for k in (1, 16, 1000):
        epoch = report(k)
        before = peak_rss_mib()
        kept: dict = {}
        ms = cpu_ms(
            {
                "first": lambda epoch=epoch: _draw("sensitivity", epoch, [(sink.figure, False)], {}),
                "later": lambda epoch=epoch, kept=kept: _draw("sensitivity", epoch, [(sink.figure, False)], kept),
            },
            repeats,
        )
        added = peak_rss_mib() - before
        figures = [ranking(Figure, epoch), correlation(Figure, epoch), profiles(Figure, epoch, 0)]
        texts = sum(1 for f in figures for t in f.findobj(Text) if t.get_visible() and t.get_text())
        width, height = (
            max(f.get_size_inches()[0] * f.dpi for f in figures),
            max(f.get_size_inches()[1] * f.dpi for f in figures),
        )
        print(
            f"| {k} | {len(figures)} | {texts} | {width:.0f} × {height:.0f} px | {ms['first']:.0f} | {ms['later']:.0f} "
            f"| {added:.0f} MiB |"
        )


if __name__ == "__main__":
    main()
