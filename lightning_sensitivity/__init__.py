"""Per-sample sensitivities of a model's outputs to named scalar parameters, for PyTorch and Lightning."""

from lightning_sensitivity._verify import SensitivityCheckError
from lightning_sensitivity.callback import SensitivityMonitor
from lightning_sensitivity.functional import per_sample_sensitivities

__all__ = ["SensitivityCheckError", "SensitivityMonitor", "per_sample_sensitivities"]
__version__ = "0.1.0"
