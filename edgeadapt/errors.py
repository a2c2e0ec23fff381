"""The one exception hierarchy of edgeadapt (torch-free).

Every error a user can cause is an :class:`EdgeAdaptError`; the CLI turns it into a one-line
message and a non-zero exit. Each subclass says *what kind* of thing was wrong; the message says
what, where, and what to do.
"""

from __future__ import annotations


class EdgeAdaptError(Exception):
    """Base class: a problem with the user's input or environment, reported without traceback."""


class ConfigError(EdgeAdaptError, ValueError):
    """An invalid option or configuration value (density outside (0, 1], top_k > E, ...)."""


class UnknownNameError(ConfigError):
    """An unknown model, task, method, mask kind, backend or adapter name."""


class MissingPackageError(EdgeAdaptError, ImportError):
    """A required optional package (model wheel, backend) is not installed."""


class AdapterFormatError(EdgeAdaptError):
    """An adapter or bundle file is corrupt, truncated, hand-edited or otherwise invalid."""


class FingerprintMismatchError(AdapterFormatError):
    """An adapter was trained on a different base model than the one it is applied to."""


class TargetMismatchError(EdgeAdaptError):
    """An adapter touches weights the bundle does not expose as adaptable."""


class BundleError(EdgeAdaptError):
    """A deployment bundle is missing, incomplete or inconsistent."""


class ExportError(EdgeAdaptError):
    """Exporting a model to a backend failed or produced a graph that does not match PyTorch."""


class SwitchError(EdgeAdaptError):
    """An adapter switch on a loaded runtime was refused; the weights were left untouched."""


class ParityError(EdgeAdaptError):
    """A backend's output does not match the PyTorch reference (e.g. stale packed weights)."""


class WriteError(EdgeAdaptError, OSError):
    """An output file could not be written (permissions, no space, a path through a file); the
    file it would have replaced is left as it was."""
