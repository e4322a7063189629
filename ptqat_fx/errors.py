"""The exceptions ptqat-fx raises; each message names the culprit and the fix."""
from __future__ import annotations


class PTQATError(Exception):
    """Base class of every ptqat-fx error."""


class ConfigError(PTQATError, ValueError):
    """A configuration field is out of range or of the wrong kind."""


class TraceError(PTQATError):
    """torch.fx could not trace the model; the message says where and which option helps."""


class CalibrationError(PTQATError):
    """Calibration data is missing, empty or not finite."""


class InputError(PTQATError, ValueError):
    """An argument of a public function (example inputs, data) is unusable."""


class SerializationError(PTQATError):
    """A model cannot be saved without code, or a saved file is corrupted, truncated or foreign."""


class NonFiniteError(PTQATError, FloatingPointError):
    """Training met a non-finite loss, gradient or parameter; the message names the step and batch."""
