# Sourced by the other scripts: create (once) and activate a virtual environment with the package installed.
#   VENV        where the environment lives (default: .venv in the project root)
#   TORCH_SPEC  the torch requirement installed first (default: torch==2.13.0, the CPU build this project's
#               machines serve from local disk; set it to match your platform, e.g. "torch>=2.3")
#   EXTRAS      the package extras to install (default: test)
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-test}
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating virtual environment $VENV"
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
echo "setup: installing $TORCH_SPEC, then lightning-sensitivity[$EXTRAS] (editable)"
python -m pip install -q --disable-pip-version-check "$TORCH_SPEC"
python -m pip install -q --disable-pip-version-check -e ".[$EXTRAS]"
python -c "import torch, lightning_sensitivity; print(f'setup: torch {torch.__version__}, lightning-sensitivity {lightning_sensitivity.__version__}')"
