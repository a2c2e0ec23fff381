"""On-device adapter switching: ``load(bundle)`` -> :class:`Runtime` (``switch``, ``run``).

The switch engine (``engine.py``) is backend-neutral numpy; ONNX Runtime and ExecuTorch supply
weight stores (the interface: ``store.py``); ``prepared.py`` validates adapters against them.
Importing this package, and the whole ONNX Runtime path, imports no torch.
"""

from edgeadapt.runtime.api import BACKENDS, MODES, Runtime, choose_mode, load
from edgeadapt.runtime.engine import SwitchEngine
from edgeadapt.runtime.prepared import PreparedAdapter
from edgeadapt.runtime.store import ArrayStore, LiveWeight, WeightStore, to_backend_index

__all__ = [
    "BACKENDS", "MODES", "ArrayStore", "LiveWeight", "PreparedAdapter", "Runtime",
    "SwitchEngine", "WeightStore", "choose_mode", "load", "to_backend_index",
]
