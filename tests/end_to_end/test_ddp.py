"""Real 2-process DDP on CPU (gloo) against a single-process run and the analytic answer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import assert_histogram, expected_stats, physics_data, read_events

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = "tests.end_to_end.ddp_script"
PADDING_SCRIPT = "tests.end_to_end.ddp_padding_script"


def run(out_dir: Path, devices: int, n_val: int, *extra: str) -> tuple[dict, dict]:
    launch(SCRIPT, out_dir, str(devices), str(n_val), *extra)
    return read_events(out_dir)  # the fit's events only: read_events does not descend into subdirectories


def launch(script: str, *args: object) -> None:
    """``python -m script args`` from the repository root (the script imports ``tests.helpers``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE"))}
    result = subprocess.run(
        [sys.executable, "-m", script, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[dict, dict]]:
    root = tmp_path_factory.mktemp("ddp")
    n_val = 25  # odd: DistributedSampler pads rank 1 with a repeat of sample 0
    return {
        "single": run(root / "single", 1, n_val),
        "ddp": run(root / "ddp", 2, n_val, "--then-single"),
        "ddp-keep": run(root / "ddp-keep", 2, n_val, "--keep-duplicates"),
        "ddp-one": run(root / "ddp-one", 2, 1),  # rank 1 holds nothing but a repeat of sample 0
        "ddp-spawn": run(root / "ddp-spawn", 2, n_val, "--spawn"),  # pickles the monitors into its processes
        "ddp-dir": str(root / "ddp"),
    }


def test_ddp_histogram_covers_every_sample_exactly_once(runs):
    x = physics_data(25, seed=1).tensors[0]
    analytic = expected_stats(x[:, :1].expand(-1, 3))  # dy/dC, 3 outputs per sample
    single_hist, single_scalars = runs["single"]
    ddp_hist, ddp_scalars = runs["ddp"]
    for hist in (single_hist, ddp_hist):
        events = hist["sensitivity/C"]
        assert [e.step for e in events] == [2, 4]
        for event in events:
            assert_histogram(event, analytic)
    for tag in ("sensitivity/C", "sensitivity/net.0.weight[3, 1]"):
        for one, two in zip(single_hist[tag], ddp_hist[tag], strict=True):
            a, b = one.histogram_value, two.histogram_value
            assert a.num == b.num  # every sample exactly once
            assert list(a.bucket) == list(b.bucket) and list(a.bucket_limit) == list(b.bucket_limit)
            # float32 rounding: auto may pick another mode in the other run, or sum in another order
            assert (a.min, a.max, a.sum) == pytest.approx((b.min, b.max, b.sum), rel=1e-6, abs=1e-9)
            assert a.sum_squares == pytest.approx(b.sum_squares, rel=1e-6)
    for stat in ("mean", "std", "abs_mean", "nonfinite"):
        tag = f"sensitivity/C/{stat}"
        assert ddp_scalars[tag][-1].value == pytest.approx(single_scalars[tag][-1].value, rel=1e-6, abs=1e-9)
    assert ddp_scalars["sensitivity/C/mean"][-1].value == pytest.approx(analytic["mean"], rel=1e-6)


def test_ddp_analysis_equals_one_process(runs):
    """Relative sensitivities, their ranking, correlation, collinearity and profiles: the same from 2 processes
    as from 1, on every rank."""
    root = Path(runs["ddp-dir"]).parent
    single = torch.load(root / "single" / "analysis_rank0.pt")
    for rank in (0, 1):
        ddp = torch.load(root / "ddp" / f"analysis_rank{rank}.pt")
        for label, stats in single["summary"].items():
            assert ddp["summary"][label]["count"] == stats["count"] == 75
            assert ddp["summary"][label]["rank"] == stats["rank"]
            for key in ("mean", "std", "abs_mean", "mean_square", "min", "max"):
                # float32 rounding: the other run may sum in another order, or auto may pick the other mode
                assert ddp["summary"][label][key] == pytest.approx(stats[key], rel=1e-6, abs=1e-9), (label, key)
        assert ddp["correlation"][0] == single["correlation"][0]
        torch.testing.assert_close(ddp["correlation"][1], single["correlation"][1], rtol=1e-6, atol=1e-9)
        for label, profile in single["profiles"].items():
            for key in ("mean", "abs_mean"):
                torch.testing.assert_close(ddp["profiles"][label][key], profile[key], rtol=1e-6, atol=1e-9)
        for what in ("fisher", "covariance"):  # the raw information, merged by a sum: as from one process
            assert ddp[what][0] == single[what][0]
            torch.testing.assert_close(ddp[what][1], single[what][1], rtol=1e-6, atol=1e-12)
        for label, stats in single["summary"].items():
            assert ddp["summary"][label]["stderr"] == pytest.approx(stats["stderr"], rel=1e-6)
        assert ddp["identifiability"]["verdicts"] == single["identifiability"]["verdicts"]
    _, single_scalars = runs["single"]
    _, ddp_scalars = runs["ddp"]
    for tag in (
        "analysis/collinearity",
        "analysis/C/mean_square",
        "analysis/net.2.bias[1]/nonfinite",
        "analysis/C/stderr",
    ):
        assert ddp_scalars[tag][-1].value == pytest.approx(single_scalars[tag][-1].value, rel=1e-6), tag


def test_ddp_spawn_logs_what_ddp_logs(runs):
    spawned_hist, spawned_scalars = runs["ddp-spawn"]
    hist, scalars = runs["ddp"]
    assert spawned_hist.keys() == hist.keys() and spawned_scalars.keys() == scalars.keys()
    for tag, events in hist.items():
        for a, b in zip(events, spawned_hist[tag], strict=True):
            assert (a.step, a.histogram_value.num, a.histogram_value.min) == (
                b.step,
                b.histogram_value.num,
                b.histogram_value.min,
            ), tag
            assert b.histogram_value.sum == pytest.approx(a.histogram_value.sum, rel=1e-6, abs=1e-9), tag


def test_single_device_run_after_ddp_counts_only_its_own_samples(runs):
    """The DDP run's process group outlives its fit; a later one-device run must not sync over it."""
    root = Path(runs["ddp-dir"])
    histograms, _ = read_events(root / "single_rank0")
    (event,) = histograms["sensitivity/C"]
    assert_histogram(event, expected_stats(physics_data(25, seed=1).tensors[0][:, :1].expand(-1, 3)))  # num 75, not 150


def test_ddp_padding_repeats_are_counted_when_asked(runs):
    x = physics_data(25, seed=1).tensors[0]
    padded = x[[*range(25), 0], :1].expand(-1, 3)  # the sampler's repeat of sample 0
    (first, _) = runs["ddp-keep"][0]["sensitivity/C"]
    assert_histogram(first, expected_stats(padded))


def test_ddp_rank_without_samples_of_its_own_still_joins(runs):
    x = physics_data(1, seed=1).tensors[0]
    events = runs["ddp-one"][0]["sensitivity/C"]
    assert [e.step for e in events] == [2, 4]
    for event in events:
        assert_histogram(event, expected_stats(x[:, :1].expand(-1, 3)))


def test_ddp_padding_is_found_in_samples_of_the_sampler_not_in_rows_of_the_output(tmp_path):
    """5 items or samples on 2 processes: the sampler repeats one at the end of rank 1. Batches that are items of
    several samples count them all; rows that are not the batch's samples (a flattened output, a filter) in a batch
    that holds the repeat stop every process with the ways out; without padding such rows are fine."""
    launch(PADDING_SCRIPT, tmp_path, 2)
    for rank in (0, 1):
        results = torch.load(tmp_path / f"padding_rank{rank}.pt")
        assert (results["batches"]["count"], results["batches"]["mean"]) == (15, pytest.approx(8.0))  # 1..15
        assert (results["flat-even"]["count"], results["flat-even"]["mean"]) == (24, pytest.approx(11.5))  # 0..23
        for case in ("flat", "filter"):
            assert isinstance(results[case], str), (rank, case)
            assert "tell which" in results[case] and "drop_padded_duplicates=False" in results[case], results[case]
