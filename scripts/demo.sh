#!/usr/bin/env bash
# The main job, end to end on a fresh machine: set up .venv, then fit the damped-oscillator example through
# LightningCLI with SensitivityMonitor watching its physical constants and a network weight. It prints a
# table of the sensitivities and the `tensorboard --logdir ...` command that shows their histograms.
# Extra arguments go to the CLI, e.g. `bash scripts/demo.sh --trainer.max_epochs=3`.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${EXTRAS:-cli,plots} . scripts/setup-env.sh
python examples/oscillator/train.py fit --config examples/oscillator/config.yaml "$@"
echo "(tensorboard is installed in $VENV: run 'source $VENV/bin/activate' first, or call $VENV/bin/tensorboard)"
