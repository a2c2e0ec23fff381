"""How the ExecuTorch store and decoder run a program: one interface, two runtimes.

- edgeadapt's native runner (:mod:`.native_runner`): runs with the GIL released, so a switch
  (and any other Python thread) goes on while a method runs. Used wherever it builds (a C++
  compiler, or a library built before).
- ExecuTorch's Python runtime (``executorch.runtime``, the fallback): holds the GIL for a whole
  run, so every Python thread waits for it.

Both load the same program the same way (one set of planned arenas shared by the program's
methods) and give the same outputs bit for bit::

    program = open_program(path_or_bytes, "model.pte")   # native=None: the runner if it builds
    program.releases_gil                                 # True on the runner
    outputs = program.method("forward").execute([ids])   # numpy in, numpy out
    view = program.method("forward").attribute(name)     # writable, aliasing a mutable buffer

BundleError (naming the program) where a runtime refuses a program, a method or a buffer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgeadapt.errors import BundleError, ConfigError


class EtMethod(Protocol):
    """A loaded method."""

    def execute(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The method's outputs (new arrays) for contiguous numpy ``inputs``."""

    def attribute(self, name: str) -> np.ndarray:
        """A writable array aliasing mutable buffer ``name`` (kept valid while it lives)."""


class EtProgram(Protocol):
    """A loaded program: its methods, each loaded once on first use."""

    releases_gil: bool

    def method(self, name: str) -> EtMethod:
        """Method ``name``, loaded on first use."""


def _runtime():
    try:
        from executorch.runtime import Runtime
    except ImportError as exc:  # pragma: no cover - executorch is a declared dependency
        from edgeadapt.errors import MissingPackageError

        raise MissingPackageError("backend 'executorch' needs: pip install executorch") from exc
    return Runtime.get()


class PythonMethod:
    """A method run by ExecuTorch's Python runtime (torch tensors at its boundary)."""

    def __init__(self, method: Any, what: str) -> None:
        self._method, self._what = method, what
        self._keep: list[Any] = []  # tensors whose memory attribute arrays alias

    def execute(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        import torch

        try:
            outs = self._method.execute([torch.from_numpy(np.ascontiguousarray(a))
                                         for a in inputs])
        except RuntimeError as exc:
            raise BundleError(f"{self._what}: {exc}") from exc
        return [o.numpy() for o in outs]

    def attribute(self, name: str) -> np.ndarray:
        try:
            tensor = self._method._method.get_attribute(name)
        except RuntimeError as exc:
            raise BundleError(f"{self._what}: no mutable buffer {name!r}: {exc}") from exc
        self._keep.append(tensor)
        return tensor.numpy()


class PythonProgram:
    """A program loaded by ExecuTorch's Python runtime."""

    releases_gil = False

    def __init__(self, source: Path | bytes | bytearray, what: str) -> None:
        self.what = what
        try:
            self._program = _runtime().load_program(
                bytes(source) if isinstance(source, bytearray) else source)
        except (RuntimeError, ValueError) as exc:
            raise BundleError(f"{what}: ExecuTorch cannot load this program: {exc}") from exc
        self._methods: dict[str, PythonMethod] = {}

    def method(self, name: str) -> PythonMethod:
        method = self._methods.get(name)
        if method is None:
            try:
                loaded = self._program.load_method(name)
            except (RuntimeError, KeyError) as exc:
                raise BundleError(f"{self.what}: ExecuTorch cannot load method {name!r}: {exc}"
                                  ) from exc
            method = self._methods[name] = PythonMethod(loaded, f"{self.what} {name}")
        return method


def runner_unavailable() -> str | None:
    """Why edgeadapt's native runner cannot run programs here (then the Python runtime does),
    or None."""
    from edgeadapt.runtime.backends.executorch.native_runner import unavailable

    return unavailable()


def open_program(source: Path | bytes | bytearray, what: str, native: bool | None = None
                 ) -> EtProgram:
    """``source`` (a .pte path, or its bytes) loaded by the native runner (``native`` None:
    where it is available, :func:`runner_unavailable`; True: ConfigError where it is not) or
    by ExecuTorch's Python runtime (``native`` False, or the runner unavailable)."""
    if native is not False:
        why = runner_unavailable()
        if why is None:
            from edgeadapt.runtime.backends.executorch.native_runner import RunnerProgram

            return RunnerProgram(source, what)
        if native:
            raise ConfigError(f"native=True: edgeadapt's ExecuTorch runner cannot be used here "
                              f"({why})")
    return PythonProgram(source, what)
