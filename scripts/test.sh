#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: set up .venv, lint with ruff, then pytest
# (unit tests, doctests of the package, real Trainer runs read back from TensorBoard event files).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k cli -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup-env.sh
ruff check .
python -m pytest "$@"
