"""Typed errors of the export pipeline; the CLI turns them into a message and exit code 2."""


class ExportError(RuntimeError):
    """Base class: something a release pipeline must stop on."""


class ModelSourceError(ExportError):
    """A model path, weights file or architecture name is missing, unreadable or unknown."""


class ParityError(ExportError):
    """An exported graph disagrees with its PyTorch source beyond tolerance."""


class QualityGateError(ExportError):
    """A variant (INT8/FP16) misses its quality gate against FP32."""


class DataError(ExportError):
    """The training/calibration data is missing or too small."""
