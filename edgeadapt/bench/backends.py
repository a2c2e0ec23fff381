"""Which backends a run measures: a runtime backend on a device, spelt ``NAME[:DEVICE]``.

Names are the runtime's registered backends (``edgeadapt.runtime.backends``):
``onnxruntime``, ``executorch``; devices those a backend lists (``cpu``, the default, and
``cuda``); e.g. ``onnxruntime``,
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
from edgeadapt.runtime.backends import backend_names, get_backend

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
    if name not in backend_names():
        raise ConfigError(f"unknown backend {text!r}: choose from {', '.join(backend_names())}, "
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
        raise ConfigError(f"no backends to measure: choose from {', '.join(backend_names())}")
    return targets


def unavailable(target: Target, manifest: Manifest) -> str | None:
    """Why ``target`` cannot run here at all (a device the backend does not run on, its package
    missing, no section of the bundle for it), or None, from the runtime's backend registry. Only
    this skips a backend before loading (a CUDA provider that fails to start is skipped when the
    load raises MissingPackageError); anything wrong with the bundle raises."""
    backend = get_backend(target.backend)
    if target.device not in backend.devices:
        return f"backend {backend.name!r} runs on {' or '.join(backend.devices)} only"
    missing = backend.unavailable()
    if missing is not None:
        return missing
    if not (getattr(manifest, backend.section, None) or manifest.extra.get(backend.section)):
        return (f"the bundle has no {backend.section} section "
                f"(export with --backends {backend.name})")
    return None
