"""Every recipe of docs/recipes/ runs as its own script (examples/recipes/<library>.py) and checks itself against
the loop of ``torch.autograd.grad``; run by ``bash scripts/recipes.sh``, in an environment with the libraries.
Outside it (``RECIPES_REQUIRED`` unset) a recipe whose library is not installed is skipped."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

RECIPES = Path(__file__).resolve().parents[1] / "examples" / "recipes"
#: recipe script -> the module it needs
LIBRARIES = {
    "chemprop": "chemprop",
    "pytorch_tabular": "pytorch_tabular",
    "schnetpack": "schnetpack",
    "nequip": "nequip",
    "neuralforecast": "neuralforecast",
    "pytorch_forecasting": "pytorch_forecasting",
    "scvi_tools": "scvi",
    "torchphysics": "torchphysics",
}


def test_every_recipe_is_listed():
    scripts = {p.stem for p in RECIPES.glob("*.py")} - {"reference"}
    assert scripts == set(LIBRARIES), sorted(scripts ^ set(LIBRARIES))


@pytest.mark.parametrize("recipe", sorted(LIBRARIES))
def test_every_recipe_has_its_page(recipe):
    """docs/recipes/<library>.md shows the script's recipe block (a snippet), and the site's nav lists the page."""
    root = RECIPES.parents[1]
    page = root / "docs" / "recipes" / f"{recipe}.md"
    assert page.is_file(), f"{page} is missing"
    assert f'--8<-- "examples/recipes/{recipe}.py:recipe"' in page.read_text()
    script = (RECIPES / f"{recipe}.py").read_text()
    assert "# --8<-- [start:recipe]" in script and "# --8<-- [end:recipe]" in script
    assert f"recipes/{recipe}.md" in (root / "mkdocs.yml").read_text()


@pytest.mark.parametrize("recipe", sorted(LIBRARIES))
def test_recipe(recipe, tmp_path):
    if importlib.util.find_spec(LIBRARIES[recipe]) is None:
        if os.environ.get("RECIPES_REQUIRED"):
            pytest.fail(f"{LIBRARIES[recipe]} is not installed, and RECIPES_REQUIRED is set")
        pytest.skip(f"{LIBRARIES[recipe]} is not installed (bash scripts/recipes.sh installs it)")
    run = subprocess.run(
        [sys.executable, str(RECIPES / f"{recipe}.py")], cwd=tmp_path, capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert f"RECIPE {recipe}" in run.stdout and ": OK" in run.stdout, run.stdout[-4000:]
