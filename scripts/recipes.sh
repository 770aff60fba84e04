#!/usr/bin/env bash
# The recipes' job (docs/recipes/): a virtual environment of its own, .venv-recipes, with the Lightning-based
# science libraries at the versions that install beside torch 2.13 on Python 3.11 (pyproject.toml's `recipes`
# extra, and two libraries that install only without their pins), then every examples/recipes/<library>.py run
# against the loop of torch.autograd.grad (tests_recipes/). About 5 minutes to install, 5 to run, on 2 cores.
#   VENV        where the environment lives (default: .venv-recipes)
#   TORCH_SPEC  the torch installed first and held by a pip constraint throughout (default: torch==2.13.0)
# Extra arguments go to pytest, e.g. `bash scripts/recipes.sh -k chemprop`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-recipes}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x "$VENV/bin/python" ]; then
  echo "recipes: creating virtual environment $VENV"
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
# Every pip call under a constraint that keeps torch as installed: without it, a library's requirement could
# pull a newer (multi-GB CUDA) torch.
constraint=$(mktemp)
trap 'rm -f "$constraint"' EXIT
echo "$TORCH_SPEC" > "$constraint"
export PIP_CONSTRAINT=$constraint PIP_DISABLE_PIP_VERSION_CHECK=1
echo "recipes: installing $TORCH_SPEC, then lightning-sensitivity[recipes] (editable)"
python -m pip install -q "$TORCH_SPEC"
python -m pip install -q -e ".[recipes]"
# torchphysics 1.1.2 pins numpy<2 (it runs on numpy 2 here) and wants jupyter; schnetpack 2.0.4 pins
# torchmetrics==1.0.1, which conflicts with lightning-sensitivity (>=1.3) and nequip (>=1.6). Both without
# their dependencies, and schnetpack's others by hand (docs/recipes/torchphysics.md, schnetpack.md).
python -m pip install -q --no-deps torchphysics==1.1.2 schnetpack==2.0.4
python -m pip install -q dirsync fasteners hydra-colorlog torch-ema
if python -m pip show -q torchvision >/dev/null 2>&1; then
  echo "recipes: torchvision got installed; torchmetrics then fails to import beside torch 2.13" >&2
  exit 1
fi
python - <<'PY'
from importlib.metadata import version
names = ["torch", "lightning", "torchmetrics", "numpy", "pandas", "chemprop", "pytorch-forecasting",
         "neuralforecast", "pytorch_tabular", "scvi-tools", "nequip", "schnetpack", "torchphysics"]
print("recipes: " + ", ".join(f"{n} {version(n)}" for n in names))
PY
RECIPES_REQUIRED=1 python -m pytest tests_recipes -p no:cacheprovider -q "$@"
