#!/usr/bin/env bash
# The test suite against the lowest versions pyproject.toml declares, so that its lower bounds stay true: in a
# separate .venv-lowest (see BASE_VENV below), torch first (TORCH_SPEC, default torch==2.13.0), then the package
# with its `test` extra, every lower bound of `dependencies` and of the `cli` extra pinned with == (read from
# pyproject.toml; the test tools themselves, pytest, ruff, transformers, torchdiffeq and torchode, at their
# newest).
#
# Which tests: by default those where the pinned packages do the work: the monitor in a real Trainer
# (tests/monitor: logging, the stages, TensorBoard and the other loggers, figures, the step's call taken over
# through Lightning's hooks, faults, checkpoints and resume, the monitor's arguments and errors), its aggregator,
# a torchmetrics Metric (tests/engine/test_statistics.py), LightningCLI with the lowest jsonargparse
# (tests/end_to_end/test_examples.py) and the package's doctests. Left out, to keep CI within its time: the rest of
# the engine's own tests (tests/engine: torch and the test tools only, the same versions as in the main job), the
# engine's cases inside a Trainer (tests/monitor/test_models.py: torch.compile, an adjoint ODE solver) and the rest
# of tests/end_to_end (the multi-process runs, minutes of process start-up each, and the package's shape).
# Arguments replace that selection and go to pytest, e.g. `bash scripts/test-lowest.sh tests` for everything, or
# `bash scripts/test-lowest.sh -k cli -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
lowest=$(mktemp)
trap 'rm -f "$lowest"' EXIT
# (tomllib: the machine's python3 must be 3.11 or newer)
python3 - "$lowest" <<'PY'
import re, sys, tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
pins = []
for requirement in project["dependencies"] + project["optional-dependencies"]["cli"]:
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?\s*>=\s*([^,;\s]+)", requirement.strip())
    if match is None:
        sys.exit(f"test-lowest: no lower bound to pin in {requirement!r}")
    name, version = match.groups()
    if name != "torch":  # one torch build installs here: TORCH_SPEC
        pins.append(f"{name}=={version}")
open(sys.argv[1], "w").write("\n".join(pins) + "\n")
print("test-lowest: pinned", ", ".join(pins))
PY
VENV=${VENV:-.venv-lowest}
# BASE_VENV (CI sets it to the main job's .venv): packages not installed here are taken from that environment,
# through a .pth file that puts its site-packages after this one's, so torch is not unpacked a second time;
# what pip installs here (the pinned versions above, and anything they need at other versions) comes first.
if [ -n "${BASE_VENV:-}" ] && [ ! -x "$VENV/bin/python" ]; then
  base_site=$("$BASE_VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  python3 -m venv "$VENV"
  "$VENV/bin/python" -c "import sys, sysconfig; open(sysconfig.get_paths()['purelib'] + '/zz_base_venv.pth', 'w').write(sys.argv[1] + '\n')" "$base_site"
  echo "test-lowest: packages not installed in $VENV come from $base_site"
fi
# PIP_CONSTRAINT holds every pip call of setup-env.sh to those versions.
PIP_CONSTRAINT="$lowest" VENV=$VENV EXTRAS=test . scripts/setup-env.sh
python -c "
import importlib.metadata as m
print('test-lowest:', ', '.join(f'{p} {m.version(p)}' for p in ('torch', 'lightning', 'torchmetrics', 'tensorboard', 'jsonargparse', 'numpy')))"
if [ $# -eq 0 ]; then
  set -- tests/monitor --ignore=tests/monitor/test_models.py tests/engine/test_statistics.py \
    tests/end_to_end/test_examples.py lightning_sensitivity
fi
python -m pytest -p no:cacheprovider -n "${PYTEST_WORKERS:-2}" "$@"  # none of these files has a module fixture
