"""The runtime's backends: what one supplies (:class:`Backend`) and the registry ``load`` picks
from (:func:`get_backend`).

A backend is a subpackage ``runtime/backends/<name>/``: ``__init__.py`` with its
:class:`Backend` object, ``store.py`` with its :class:`~edgeadapt.runtime.store.WeightStore`
(what the switch engine edits), ``variant.py`` with its
:class:`~edgeadapt.runtime.unfused.VariantRoute` (unfused adapters), and ``kernel.py`` where it
builds a kernel of edgeadapt's own. The shipped ones are registered by the one line
:data:`BUILTIN`; others at run time with :func:`register_backend` (docs/design.md, "Adding a
backend"). Nothing outside a backend's subpackage names it but that line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

from edgeadapt.errors import ConfigError, UnknownNameError
from edgeadapt.format.manifest import Manifest
from edgeadapt.runtime.backends import executorch, onnxruntime
from edgeadapt.runtime.store import WeightStore
from edgeadapt.runtime.unfused import VariantRoute


@runtime_checkable
class Backend(Protocol):
    """What ``edgeadapt.runtime.load`` needs of a backend.

    name: what ``load(backend=...)`` takes. devices: the ``device=`` values it runs on.
    section: the bundle.json key of its files (``manifest.<section>``, and each graph
    variant's entry). default_live_form: the live form its exporter writes today, what the
    auto policy assumes without a bundle (:func:`edgeadapt.runtime.policy.choose_mode`).
    """

    name: str
    devices: tuple[str, ...]
    section: str
    default_live_form: str

    def unavailable(self) -> str | None:
        """What must be installed to use it (a pip command), or None."""

    def use_kernel(self, manifest: Manifest, device: str, mode: str, kernel: bool | None
                   ) -> bool:
        """Whether the store reads the live weights with a kernel of edgeadapt's own; ``kernel``
        is ``load``'s argument (None: where it can be built). ConfigError where it cannot
        honour ``kernel=True``."""

    def live_form(self, manifest: Manifest, kernel: bool) -> str:
        """How live mode reads the bundle's live weights (``kernel``: :meth:`use_kernel`'s
        answer): the key of the auto policy's thresholds (runtime/policy.json)."""

    def live_blocker(self, manifest: Manifest) -> str | None:
        """Why live mode cannot run here while repack can (``auto`` then repacks), or None."""

    def open_store(self, bundle_dir: Path, manifest: Manifest, *, device: str, mode: str,
                   threads: int | None, kernel: bool) -> WeightStore:
        """The weight store of the bundle in ``mode`` ("live" or "repack") on ``device``."""

    def open_variant(self, bundle_dir: Path, manifest: Manifest, key: str, store: WeightStore,
                     *, device: str, threads: int | None) -> VariantRoute:
        """The route runs take while an adapter of graph variant ``key`` is active; ``store``
        is the fused store (whose live buffers the variant may share)."""


_REGISTRY: dict[str, Backend] = {}


def register_backend(backend: Backend, *, replace: bool = False) -> Backend:
    """Make ``backend`` loadable as ``load(..., backend=backend.name)``; returns it.
    ConfigError if it lacks a member of :class:`Backend`, or if another backend has its name
    (unless ``replace``)."""
    if not isinstance(backend, Backend):
        missing = [m for m in (*Backend.__annotations__, *_METHODS) if not hasattr(backend, m)]
        raise ConfigError(f"register_backend: {backend!r} lacks {missing} "
                          "(edgeadapt.runtime.backends.Backend)")
    known = _REGISTRY.get(backend.name)
    if known is not None and known is not backend and not replace:
        raise ConfigError(f"backend {backend.name!r} is registered already "
                          "(register_backend(..., replace=True) replaces it)")
    _REGISTRY[backend.name] = backend
    return backend


def unregister_backend(name: str) -> None:
    """Remove backend ``name`` (UnknownNameError if it is not registered)."""
    get_backend(name)
    del _REGISTRY[name]


def get_backend(name: str) -> Backend:
    """The backend registered as ``name``; UnknownNameError naming the choices otherwise."""
    backend = _REGISTRY.get(name) if isinstance(name, str) else None
    if backend is None:
        raise UnknownNameError(f"backend {name!r}: choose one of {', '.join(_REGISTRY)}")
    return backend


def backend_names() -> tuple[str, ...]:
    """Names of the registered backends, in registration order."""
    return tuple(_REGISTRY)


_METHODS = ("unavailable", "use_kernel", "live_form", "live_blocker", "open_store",
            "open_variant")

#: the backends edgeadapt ships: adding one is one entry here (docs/design.md)
BUILTIN: tuple[Backend, ...] = (onnxruntime.BACKEND, executorch.BACKEND)
for _backend in BUILTIN:
    register_backend(_backend)
