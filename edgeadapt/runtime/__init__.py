"""On-device adapter switching: ``load(bundle)`` -> :class:`Runtime` (``switch``, ``run``).

The switch engine (``engine.py``) is backend-neutral numpy; each backend
(``backends/<name>/``, registered in :mod:`edgeadapt.runtime.backends`) supplies a weight store
(the interface: ``store.py``) and a route for unfused adapters; ``prepared.py`` validates
adapters against the store, ``policy.py`` picks live or repack for ``mode="auto"``. Importing
this package, and the whole ONNX Runtime path, imports no torch.
"""

from edgeadapt.runtime.api import MODES, Runtime, load
from edgeadapt.runtime.backends import backend_names, get_backend, register_backend
from edgeadapt.runtime.engine import SwitchEngine
from edgeadapt.runtime.policy import choose_mode
from edgeadapt.runtime.prepared import PreparedAdapter
from edgeadapt.runtime.store import ArrayStore, LiveWeight, WeightStore, to_backend_index

__all__ = [
    "BACKENDS", "MODES", "ArrayStore", "LiveWeight", "PreparedAdapter", "Runtime",
    "SwitchEngine", "WeightStore", "backend_names", "choose_mode", "get_backend", "load",
    "register_backend", "to_backend_index",
]


def __getattr__(name: str):
    if name == "BACKENDS":  # the registry's names now, including backends registered later
        return backend_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
