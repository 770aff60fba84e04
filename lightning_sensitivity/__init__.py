"""Per-sample sensitivities of a model's outputs to named scalar parameters, for PyTorch and Lightning.

Two halves: :func:`per_sample_sensitivities` (torch only) and :class:`SensitivityMonitor` (a Lightning
callback). Importing the package or the function loads neither Lightning nor torchmetrics; the monitor is
imported on first access (PEP 562), so ``lightning_sensitivity.SensitivityMonitor`` works as a LightningCLI
``class_path``.
"""

from typing import TYPE_CHECKING, Any

from lightning_sensitivity._identify import predictive_std
from lightning_sensitivity._plans import DEFAULT_PLANS, Plans
from lightning_sensitivity._verify import Mismatch, SensitivityCheckError
from lightning_sensitivity.functional import per_sample_sensitivities

if TYPE_CHECKING:
    from lightning_sensitivity.callback import SensitivityMonitor

__all__ = [
    "DEFAULT_PLANS",
    "Mismatch",
    "Plans",
    "SensitivityCheckError",
    "SensitivityMonitor",
    "per_sample_sensitivities",
    "predictive_std",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "SensitivityMonitor":
        from lightning_sensitivity.callback import SensitivityMonitor

        return SensitivityMonitor
    raise AttributeError(f"module 'lightning_sensitivity' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "SensitivityMonitor"])
