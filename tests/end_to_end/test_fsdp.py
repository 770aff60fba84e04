"""Sharded models: FSDP2 (``fully_shard``) under ``ModelParallelStrategy`` on 2 CPU processes (gloo) gives the
same statistics as one unsharded process, for targets in the root group and in a sharded submodule, on both
ranks' shards."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import FSDP_TARGETS, read_events

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = "tests.end_to_end.fsdp_script"

pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch.distributed")
if not hasattr(__import__("torch.distributed.fsdp", fromlist=["fully_shard"]), "fully_shard"):
    pytest.skip("torch.distributed.fsdp.fully_shard (FSDP2) is not available", allow_module_level=True)


def run(out_dir: Path, kind: str, call: str) -> Path:
    """``python -m`` the script from the repository root (it imports ``tests.helpers``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE"))}
    result = subprocess.run(
        [sys.executable, "-m", SCRIPT, str(out_dir), kind, call],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fsdp")
    return {
        "single": run(root / "single", "single", "call"),
        "call": run(root / "call", "sharded", "call"),  # FSDP initialised by validation_step first
        "nocall": run(root / "nocall", "sharded", "nocall"),  # the monitor's forward is FSDP's first
    }


@pytest.mark.parametrize("case", ["call", "nocall"])
def test_sharded_statistics_equal_one_process(runs, case):
    single = torch.load(runs["single"] / "summary_rank0.pt")
    for rank in (0, 1):
        sharded = torch.load(runs[case] / f"summary_rank{rank}.pt")
        for phase in ("validate", "fit"):
            assert set(sharded[phase]) == set(FSDP_TARGETS) == set(single[phase])
            for label, stats in single[phase].items():
                assert stats["abs_mean"] > 0, label  # no silent zero in the reference either
                assert sharded[phase][label]["count"] == stats["count"] == 16 * 3
                for key in ("mean", "std", "abs_mean", "mean_square", "min", "max"):
                    # float32 rounding: the other run may sum in another order, or auto may pick the other mode
                    assert sharded[phase][label][key] == pytest.approx(stats[key], rel=1e-6, abs=1e-9), (label, key)
        for label, profile in single["profiles"].items():
            torch.testing.assert_close(sharded["profiles"][label]["mean"], profile["mean"], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("case", ["call", "nocall"])
def test_sharded_histograms_equal_one_process(runs, case):
    single, _ = read_events(runs["single"])
    sharded, scalars = read_events(runs[case])
    for label in FSDP_TARGETS:
        tag = f"sensitivity/{label}"
        assert [e.step for e in sharded[tag]] == [e.step for e in single[tag]]
        for one, two in zip(single[tag], sharded[tag], strict=True):
            a, b = one.histogram_value, two.histogram_value
            assert a.num == b.num  # every sample once
            assert list(a.bucket) == list(b.bucket)
            # float32 rounding: the one-process run may sum in another order, or auto may pick the other mode
            assert (a.min, a.max, a.sum) == pytest.approx((b.min, b.max, b.sum), rel=1e-6, abs=1e-9)
    assert "sensitivity/collinearity" in scalars
