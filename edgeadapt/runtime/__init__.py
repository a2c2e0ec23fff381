"""On-device adapter switching: ``load(bundle)`` -> :class:`Runtime` (``switch``, ``run``).

The switch engine (``engine.py``) is backend-neutral numpy; ONNX Runtime and ExecuTorch supply
weight stores. Importing this package, and the whole ONNX Runtime path, imports no torch.
"""

from edgeadapt.runtime.api import BACKENDS, MODES, Runtime, choose_mode, load
from edgeadapt.runtime.engine import (
    ArrayStore,
    LiveWeight,
    PreparedAdapter,
    SwitchEngine,
    WeightStore,
    to_backend_index,
)

__all__ = [
    "BACKENDS", "MODES", "ArrayStore", "LiveWeight", "PreparedAdapter", "Runtime",
    "SwitchEngine", "WeightStore", "choose_mode", "load", "to_backend_index",
]
