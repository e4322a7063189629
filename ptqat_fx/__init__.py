"""ptqat-fx: PTQAT (hybrid post-training + quantization-aware training) as torch.fx passes."""
from .api import quantize
from .config import QuantConfig, Select
from .errors import CalibrationError, ConfigError, InputError, PTQATError, TraceError

__all__ = [
    "quantize",
    "QuantConfig",
    "Select",
    "PTQATError",
    "ConfigError",
    "TraceError",
    "CalibrationError",
    "InputError",
]
