"""Which backends a run measures: a runtime backend on a device, spelt ``NAME[:DEVICE]``.

Names are the runtime's (``edgeadapt.runtime.load(backend=...)``): ``onnxruntime``,
``executorch``; devices ``cpu`` (the default) and ``cuda``; e.g. ``onnxruntime``,
``onnxruntime:cuda``, ``executorch``. The PyTorch PEFT peers are reported as backend
``pytorch`` on the CPU. Every row of the report carries ``backend`` and ``device``; the maps
keyed by backend (threads, live forms, the floor per backend) use ``backend:device``
(:attr:`Target.key`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from edgeadapt.errors import ConfigError
from edgeadapt.format.manifest import Manifest

BACKENDS = ("onnxruntime", "executorch")
DEVICES = ("cpu", "cuda")
#: spellings of earlier releases -> the one to use now
RENAMED = {"onnxruntime-cpu": "onnxruntime", "onnxruntime-cuda": "onnxruntime:cuda"}


@dataclass(frozen=True)
class Target:
    """One backend on one device."""

    backend: str
    device: str = "cpu"

    @property
    def key(self) -> str:
        """``backend:device``, the key of the report's per-backend maps."""
        return f"{self.backend}:{self.device}"

    def fields(self) -> dict[str, str]:
        """The ``backend`` and ``device`` fields of a report row."""
        return {"backend": self.backend, "device": self.device}


#: the PEFT peers' rows
PYTORCH = Target("pytorch", "cpu")


def parse_target(spec: str, device: str = "cpu") -> Target:
    """``NAME[:DEVICE]`` -> Target; ``device`` for a spec without one. ConfigError naming the
    accepted spellings (and the new one for an old name such as ``onnxruntime-cpu``)."""
    text = spec.strip()
    if text in RENAMED:
        raise ConfigError(f"backend {text!r} is now spelt {RENAMED[text]!r} "
                          "(NAME[:DEVICE], e.g. onnxruntime, onnxruntime:cuda, executorch)")
    name, _, dev = text.partition(":")
    dev = dev or device
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {text!r}: choose from {', '.join(BACKENDS)}, "
                          f"optionally with a device (:{' or :'.join(DEVICES)})")
    if dev not in DEVICES:
        raise ConfigError(f"backend {text!r}: unknown device {dev!r}: choose from "
                          f"{', '.join(DEVICES)}")
    return Target(name, dev)


def parse_targets(specs: Sequence[str], device: str = "cpu") -> list[Target]:
    """Each of ``specs`` by :func:`parse_target`, duplicates dropped, in order; ConfigError when
    none is left."""
    targets = list(dict.fromkeys(parse_target(s, device) for s in specs if s.strip()))
    if not targets:
        raise ConfigError(f"no backends to measure: choose from {', '.join(BACKENDS)}")
    return targets


def unavailable(target: Target, manifest: Manifest) -> str | None:
    """Why ``target`` cannot run here at all (no package, no section of the bundle for it, no
    GPU), or None. Only this skips a backend; anything wrong with the bundle raises."""
    if target.backend == "onnxruntime":
        if not manifest.onnxruntime:
            return "the bundle has no ONNX model (export with --backends onnxruntime)"
        try:
            import onnxruntime as ort
        except ImportError:
            return "onnxruntime is not installed"
        if target.device == "cuda" and \
                "CUDAExecutionProvider" not in ort.get_available_providers():
            return "no CUDA execution provider here (onnxruntime-gpu)"
        return None
    if target.device != "cpu":
        return "ExecuTorch runs on the CPU only"
    if not manifest.executorch:
        return "the bundle has no ExecuTorch program (export with --backends executorch)"
    return None
