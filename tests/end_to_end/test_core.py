"""The shape of the package: two halves (the engine loads no Lightning), no import cycles, no hidden
process-wide state (what is learned lives in a Plans object the caller owns, and a forced method wins), and a
monitor whose deep copies report what the copy that ran found."""

from __future__ import annotations

import ast
import copy
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sensitivity import DEFAULT_PLANS, Plans, SensitivityMonitor, per_sample_sensitivities
from tests.helpers import read_text_and_images

PACKAGE = Path(__file__).resolve().parents[2] / "lightning_sensitivity"


def test_the_function_loads_neither_lightning_nor_torchmetrics():
    code = (
        "import sys\n"
        "import lightning_sensitivity\n"
        "from lightning_sensitivity import per_sample_sensitivities, Plans, SensitivityCheckError\n"
        "import torch\n"
        "per_sample_sensitivities(torch.nn.Linear(2, 1), 'bias[0]', torch.ones(3, 2))\n"
        "assert not any(m.split('.')[0] in ('lightning', 'torchmetrics', 'pytorch_lightning') for m in sys.modules), "
        "sorted(m for m in sys.modules if m.startswith(('lightning', 'torchmetrics')))\n"
        "print(lightning_sensitivity.SensitivityMonitor.__module__)\n"  # loaded on first access
        "assert 'lightning' in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "lightning_sensitivity.callback"


def _imports() -> dict[str, set[str]]:
    """Module -> the package's modules it imports at import time (not under ``if TYPE_CHECKING``)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.glob("*.py"):
        name = "lightning_sensitivity" if path.stem == "__init__" else f"lightning_sensitivity.{path.stem}"
        tree = ast.parse(path.read_text())
        found: set[str] = set()
        for node in tree.body:  # module level only: imports inside functions are lazy by design
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            for inner in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) else []:
                if isinstance(inner, ast.ImportFrom) and inner.module and inner.module.startswith("lightning_sens"):
                    found.add(inner.module)
                    found.update(f"{inner.module}.{a.name}" for a in inner.names)
                elif isinstance(inner, ast.Import):
                    found.update(a.name for a in inner.names if a.name.startswith("lightning_sensitivity"))
        graph[name] = found
    return {name: {m for m in deps if m in graph and m != name} for name, deps in graph.items()}


def test_no_import_cycles():
    graph = _imports()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                pytest.fail(f"import cycle: {' -> '.join([*path, node, dep])}")
            if dep not in state:
                visit(dep, [*path, node])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_the_engine_imports_no_lightning_module():
    graph = _imports()
    lightning_side = {f"lightning_sensitivity.{m}" for m in ("callback", "_batches", "_stage", "_publish", "_epoch")}
    reachable, todo = set(), ["lightning_sensitivity.functional", "lightning_sensitivity"]
    while todo:
        module = todo.pop()
        if module not in reachable:
            reachable.add(module)
            todo.extend(graph[module])
    assert not reachable & lightning_side


class Pairwise(nn.Module):
    """``torch.cdist`` has no forward-mode formula."""

    def __init__(self) -> None:
        super().__init__()
        self.centres = nn.Parameter(torch.randn(3, 2))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cdist(x, self.centres)


def test_a_forced_method_wins_over_what_auto_learned():
    torch.manual_seed(0)
    model, x = Pairwise(), torch.randn(4, 2)
    plans = Plans()
    with pytest.raises(RuntimeError, match="forward-mode AD is not available"):
        per_sample_sensitivities(model, "centres[0, 1]", (x,), method="forward", plans=plans)
    with pytest.warns(UserWarning, match="falling back to batched reverse mode"):
        per_sample_sensitivities(model, "centres[0, 1]", (x,), plans=plans)
    assert plans[model].reverse
    with pytest.raises(RuntimeError, match="forward-mode AD is not available"):  # not reverse mode in silence
        per_sample_sensitivities(model, "centres[0, 1]", (x,), method="forward", plans=plans)


def test_plans_belong_to_their_caller_and_can_be_cleared():
    torch.manual_seed(0)
    model, x = Pairwise(), torch.randn(4, 2)
    mine = Plans()
    with pytest.warns(UserWarning, match="falling back"):
        per_sample_sensitivities(model, "centres[0, 1]", (x,), plans=mine)
    assert model in mine and len(mine) == 1 and model not in DEFAULT_PLANS
    with pytest.warns(UserWarning, match="falling back"):  # another owner learns afresh, and warns afresh
        per_sample_sensitivities(model, "centres[0, 1]", (x,), plans=Plans())
    mine.forget(model)
    assert model not in mine
    with pytest.warns(UserWarning, match="falling back"):
        per_sample_sensitivities(model, "centres[0, 1]", (x,), plans=mine)
    mine.clear()
    assert len(mine) == 0
    with pytest.raises(TypeError, match="plans must be a lightning_sensitivity.Plans"):
        per_sample_sensitivities(model, "centres[0, 1]", (x,), plans={})


class Line(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.C = nn.Parameter(torch.tensor(2.0))

    def forward(self, x: Tensor) -> Tensor:
        return self.C * x

    def validation_step(self, batch, batch_idx):
        self.log("val", self(batch[0]).mean())


def test_a_deep_copy_of_the_monitor_shares_its_results(tmp_path):
    """neuralforecast deep-copies the callbacks it is given: the user's handle reads what the copy found."""
    monitor = SensitivityMonitor("C", log_histograms=False, log_figures=False)
    with pytest.raises(RuntimeError, match="no epoch has been logged"):
        monitor.summary()
    ran = copy.deepcopy(monitor)
    assert ran is not monitor and ran.targets == monitor.targets and ran.targets is not monitor.targets
    x = torch.arange(12.0).reshape(12, 1)
    trainer = L.Trainer(
        logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[ran], default_root_dir=tmp_path
    )
    trainer.validate(Line(), DataLoader(TensorDataset(x), batch_size=4))
    assert monitor.summary() == ran.summary()
    assert monitor.summary()["C"]["mean"] == pytest.approx(float(x.mean()))


class Fitted(Line):
    def training_step(self, batch, batch_idx):
        return (self(batch[0]) - 1).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize(("every", "drawn"), [(True, 3), (2, 2), (False, 0)])
def test_figures_are_drawn_at_the_cadence_asked_for(tmp_path, every, drawn):
    pytest.importorskip("matplotlib")
    x = torch.arange(8.0).reshape(8, 1)
    loader = DataLoader(TensorDataset(x), batch_size=4)
    monitor = SensitivityMonitor("C", log_figures=every)
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = L.Trainer(
        max_epochs=3,
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[monitor],
        num_sanity_val_steps=0,
    )
    trainer.fit(Fitted(), loader, loader)
    texts, images = read_text_and_images(logger.log_dir)
    assert len(texts["sensitivity/summary"]) == 3  # the table at every logged epoch
    steps = {tag: [e.step for e in events] for tag, events in images.items()}
    assert all(len(s) == drawn for s in steps.values()) and (bool(steps) == bool(drawn))
    with pytest.raises(ValueError, match=r"SensitivityMonitor\(log_figures=...\)"):
        SensitivityMonitor("C", log_figures=-1)
