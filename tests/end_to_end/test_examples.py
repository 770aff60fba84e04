"""The examples end to end, through LightningCLI in a subprocess, with tiny configs; and the CLI's handling
of SensitivityMonitor from YAML and from flags."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import read_events

ROOT = Path(__file__).resolve().parents[2]
OSCILLATOR = ROOT / "examples" / "oscillator"
CLASSIFIER = ROOT / "examples" / "classifier"
TINY_OSCILLATOR = [
    "--trainer.max_epochs=2",
    "--trainer.limit_train_batches=2",
    "--data.n_train=64",
    "--data.n_val=40",
    "--data.batch_size=16",
    "--model.steps=10",
    "--data.steps=10",
]


def cli(cwd: Path, script: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(script / "train.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=None if env is None else {**os.environ, **env},
    )


def histogram_tags(root: Path) -> dict[str, list[int]]:
    (log_dir,) = {p.parent for p in root.rglob("events.out.tfevents.*")}
    histograms, _ = read_events(log_dir)
    return {tag: [e.step for e in events] for tag, events in histograms.items()}


def test_oscillator_from_yaml_prints_table_and_where_to_look(tmp_path):
    run = cli(tmp_path, OSCILLATOR, "fit", f"--config={OSCILLATOR / 'config.yaml'}", *TINY_OSCILLATOR)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert "mean |dy/dθ|" in out
    for target in ("k", "c", "m", "correction.2.weight[0, 3]"):
        assert any(line.startswith(f"{target}  ") for line in out.splitlines()), target
    assert "Correlation of the sensitivities to k and c (both fitted): " in out  # the identifiability check
    assert "m (fixed)" in out and "only a combination of k and m is determined" in out
    assert "Most correlated pair: " in out
    assert re.search(r"Fitted: k = [0-9.]+ ± [0-9.e-]+, c = [0-9.]+ ± [0-9.e-]+ \(1σ", out)  # from covariance()
    assert "Correlation of the estimates of k and c: " in out
    assert "Memory of the start: mean |dx(t)/dx(0)| is " in out  # the input target batch[0][:, 0]
    assert "Identifiability of the physical constants k, c and m" in out and "\n  - " in out  # its verdicts
    for target in ("k", "c", "m"):  # profiles along the trajectory
        assert f"  {target}: mean |d(position)/d{target}| peaks at time step " in out, target
    log_dir = tmp_path / "runs" / "oscillator" / "version_0"
    assert f"tensorboard --logdir {log_dir}" in out
    tags = histogram_tags(tmp_path)
    expected_steps = [2, 4]
    for target in ("k", "c", "m", "correction.2.weight[0, 3]"):
        assert tags[f"sensitivity/{target}"] == expected_steps


def test_callback_from_flags(tmp_path):
    run = cli(
        tmp_path,
        OSCILLATOR,
        "fit",
        *TINY_OSCILLATOR,
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
        "--trainer.callbacks+=lightning_sensitivity.SensitivityMonitor",
        '--trainer.callbacks.targets=[k, "correction.0.weight[3, 1]"]',
        "--trainer.callbacks.reduction=norm",
        "--trainer.callbacks.every_n_epochs=2",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    tags = histogram_tags(tmp_path)
    assert tags == {"sensitivity/k": [4], "sensitivity/correction.0.weight[3, 1]": [4]}


def test_one_target_as_a_plain_string_from_yaml_and_flags(tmp_path):
    config = tmp_path / "monitor.yaml"
    config.write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    - class_path: lightning_sensitivity.SensitivityMonitor\n"
        "      init_args:\n"
        "        targets: k\n"
        "        verify: warn\n"
        "        prefix: sens\n"
    )
    common = (f"--config={OSCILLATOR / 'config.yaml'}", f"--config={config}", *TINY_OSCILLATOR)
    run = cli(tmp_path, OSCILLATOR, "fit", *common)
    assert run.returncode == 0, run.stderr[-3000:]
    assert histogram_tags(tmp_path) == {"sens/k": [2, 4]}
    run = cli(tmp_path, OSCILLATOR, "fit", *common, "--trainer.callbacks.targets=c", "--print_config")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "targets: c" in run.stdout and "verify: warn" in run.stdout


def test_a_step_by_import_path_from_yaml(tmp_path):
    """``step: my_steps.final_position``: a user's own function, resolved by LightningCLI from its import path."""
    (tmp_path / "my_steps.py").write_text(
        "def final_position(pl_module, batch, batch_idx):\n    return pl_module(batch[0])[:, -1:]\n"
    )
    config = tmp_path / "monitor.yaml"
    config.write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    - class_path: lightning_sensitivity.SensitivityMonitor\n"
        "      init_args:\n"
        "        targets: [k, c]\n"
        "        step: my_steps.final_position\n"
        "        prefix: final\n"
    )
    common = (f"--config={OSCILLATOR / 'config.yaml'}", f"--config={config}", *TINY_OSCILLATOR)
    run = cli(tmp_path, OSCILLATOR, "fit", *common, env={"PYTHONPATH": str(tmp_path)})
    assert run.returncode == 0, run.stderr[-3000:]
    (log_dir,) = {p.parent for p in tmp_path.rglob("events.out.tfevents.*")}
    histograms, _ = read_events(log_dir)
    assert histograms["final/k"][-1].histogram_value.num == 40  # one value per sample: the last position only
    run = cli(tmp_path, OSCILLATOR, "fit", *common, "--print_config", env={"PYTHONPATH": str(tmp_path)})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "step: my_steps.final_position" in run.stdout


def test_print_config_shows_every_argument(tmp_path):
    run = cli(tmp_path, OSCILLATOR, "fit", f"--config={OSCILLATOR / 'config.yaml'}", "--print_config")
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert "class_path: lightning_sensitivity.SensitivityMonitor" in out
    for line in (
        "every_n_epochs: 1",
        "step: null",
        "max_batches: null",
        "reduction: none",
        "method: auto",
        "chunk_size: null",
        "log_sanity_check: false",
        "drop_padded_duplicates: true",
        "verify: true",
        "prefix: sensitivity",
    ):
        assert line in out, line
    assert "correction.2.weight[0, 3]" in out


@pytest.mark.parametrize(
    ("flag", "key"),
    [
        ("--trainer.callbacks.every_n_epochs=abc", "every_n_epochs"),
        ("--trainer.callbacks.reduction=max", "reduction"),
        ("--trainer.callbacks.chunk_size=0", "chunk_size"),
    ],
)
def test_wrong_values_are_refused_before_training(tmp_path, flag, key):
    run = cli(tmp_path, OSCILLATOR, "fit", f"--config={OSCILLATOR / 'config.yaml'}", *TINY_OSCILLATOR, flag)
    assert run.returncode != 0
    assert key in run.stderr
    assert not list(tmp_path.rglob("events.out.tfevents.*"))


def test_unknown_target_stops_the_cli_before_training(tmp_path):
    run = cli(
        tmp_path,
        OSCILLATOR,
        "fit",
        f"--config={OSCILLATOR / 'config.yaml'}",
        *TINY_OSCILLATOR,
        "--trainer.callbacks.targets=[kk]",
    )
    assert run.returncode != 0
    assert "'kk' is not a parameter or buffer of DampedOscillator; did you mean 'k'" in run.stderr
    assert "train_loss" not in run.stdout + run.stderr


def test_classifier_with_sensitivity_step_and_dict_batches(tmp_path):
    run = cli(
        tmp_path,
        CLASSIFIER,
        "fit",
        f"--config={CLASSIFIER / 'config.yaml'}",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--data.n_val=100",
        "--data.batch_size=32",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    (log_dir,) = {p.parent for p in tmp_path.rglob("events.out.tfevents.*")}
    histograms, scalars = read_events(log_dir)
    for target in ("T", "net.0.weight[0, 0]", "net.2.bias[3]"):
        (event,) = histograms[f"sensitivity/{target}"]
        assert event.histogram_value.num == 100  # one value per validation sample
        assert f"sensitivity/{target}/abs_mean" in scalars


def test_seed_example_checks_itself():
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "seed.py")], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "dy/dC = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]" in run.stdout
    assert "max |error| vs loop" in run.stdout
