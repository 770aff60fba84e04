#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: set up .venv, lint with ruff, type-check the package with mypy
# (strict), then pytest in PYTEST_WORKERS processes (pytest-xdist, default 2; 0 runs in this process; a test
# file's tests stay in one process, so that a module's fixture, such as the DDP runs, is made once) over the
# unit tests, doctests of the package and real Trainer runs read back from TensorBoard event files.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k cli -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup-env.sh
ruff check .
ruff format --check .
mypy
python -m pytest -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@"
