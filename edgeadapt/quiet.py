"""Quiet the third-party noise of the command line: warnings and log lines a user can do
nothing about.

An export prints, from the libraries it drives, deprecation notices (torch.export's pytree,
ExecuTorch's emitter), "torchvision is not installed", optional torchao kernels that fail to
load; and ExecuTorch's partitioner configures Python's root logger, which then prints
edgeadapt's own progress lines a second time. :func:`install` filters exactly those: warnings
by category and by the module that issues them, log records by the logger that emits them.
edgeadapt's own warnings and errors, and every error of the libraries, still print.

The command line calls :func:`install` once at startup (``edgeadapt.cli``), and the quickstart's
background export process again. Python's own switches win: with a ``-W`` option or
``PYTHONWARNINGS`` set, the warnings filters are left as they are; ``EDGEADAPT_VERBOSE=1`` turns
all of this off.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

#: modules whose DeprecationWarning / FutureWarning / UserWarning a user cannot act on
LIBRARY_MODULES = r"(torch\.(export|_export|onnx)|onnxscript|onnx_ir|executorch|torchao)(\.|$)"
#: transformers: only its deprecation notices (its other warnings can be about the user's model)
TRANSFORMERS_MODULES = r"transformers(\.|$)"
#: torch's pytree deprecation, raised from inside pickling (``copyreg``) during torch.export
PYTREE_MESSAGE = r"`isinstance\(treespec, LeafSpec\)` is deprecated"

#: loggers whose warnings are about the libraries' own optional parts; errors still print
QUIET_LOGGERS = (
    "torch.utils._pytree",                          # Enum register_constant deprecation
    "torch.onnx._internal.exporter._registration",  # "torchvision is not installed"
    "torchao",                                      # "Failed to load" optional CUDA kernels
)

_installed = False


def install() -> None:
    """Install the filters (idempotent). See the module docstring for what they cover."""
    global _installed
    if _installed or os.environ.get("EDGEADAPT_VERBOSE") == "1":
        return
    _installed = True
    if not sys.warnoptions:
        for category in (DeprecationWarning, FutureWarning, UserWarning):
            warnings.filterwarnings("ignore", category=category, module=LIBRARY_MODULES)
        for category in (DeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category, module=TRANSFORMERS_MODULES)
        warnings.filterwarnings("ignore", message=PYTREE_MESSAGE, category=FutureWarning)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    if not logging.root.handlers:
        # stands in for logging's last-resort handler, so that a library's later
        # logging.basicConfig() (ExecuTorch's partitioner calls it on import) is a no-op
        handler = logging.StreamHandler(sys.stderr)
        handler.setLevel(logging.WARNING)
        handler.addFilter(_not_handled_below)
        logging.root.addHandler(handler)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _not_handled_below(record: logging.LogRecord) -> bool:
    """False for a record that a handler of its own logger chain (below the root) has already
    printed, e.g. edgeadapt's progress lines, echoed by the command line."""
    logger: logging.Logger | None = logging.getLogger(record.name)
    while logger is not None and logger is not logging.root:
        if logger.handlers:
            return False
        if not logger.propagate:
            break
        logger = logger.parent
    return True


def installed() -> bool:
    """True once :func:`install` has taken effect in this process."""
    return _installed
