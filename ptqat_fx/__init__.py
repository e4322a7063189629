"""ptqat-fx: PTQAT (hybrid post-training + quantization-aware training) as torch.fx passes."""
from .api import quantize
from .config import QuantConfig, Select
from .views.dump import dump
from .errors import CalibrationError, ConfigError, InputError, PTQATError, SerializationError, TraceError
from .export.onnx import export_onnx
from .train.finetune import finetune
from .passes.convert import convert
from .views.report import Report, report
from .serialization import load, save

__all__ = [
    "quantize",
    "QuantConfig",
    "Select",
    "finetune",
    "report",
    "dump",
    "Report",
    "PTQATError",
    "ConfigError",
    "TraceError",
    "CalibrationError",
    "InputError",
    "SerializationError",
    "convert",
    "export_onnx",
    "save",
    "load",
]
