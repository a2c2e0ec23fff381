"""The ExecuTorch backend (XNNPACK programs; torch is imported to run them): ``load(bundle,
backend="executorch")``, CPU only.

- ``store.py``: the live store (mutable buffers edited in place through ``get_attribute``
  views) and the repack store (edits into a host copy of the all-constant program, reloaded per
  switch); the per-process threadpool.
- ``programs.py``: how a program is run: edgeadapt's native runner (``native_runner.py``,
  ``kernels/et_runner.cpp``: the GIL released during a run) where it builds, else ExecuTorch's
  Python runtime.
- ``kernel.py``: edgeadapt's own kernels ``edgeadapt::live_linear.out`` (and
  ``live_qlinear.out``, int8 codes + scales, ``live_q4linear.out``, int4 codes packed two per
  byte + scales, and their ``_a8`` forms taking int8 activations: quantized bundles), which
  programs exported in the ``own-kernel`` live form
  call.
- ``variant.py``: unfused adapters through a variant program's branch buffers.
- ``decoder.py``: the KV-cache decoder that generation steps (bundles exported with
  ``--generate``): the live program's ``decode`` method, reading the store's live buffers.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

from edgeadapt.errors import ConfigError
from edgeadapt.format.manifest import Manifest
from edgeadapt.runtime.store import WeightStore
from edgeadapt.runtime.unfused import VariantRoute

if TYPE_CHECKING:
    from edgeadapt.runtime.backends.executorch.decoder import EtDecoder

#: the bundle.json section holding the ExecuTorch programs (the base's and each variant's)
SECTION = "executorch"


class ExecutorchBackend:
    """:class:`edgeadapt.runtime.backends.Backend` for ExecuTorch."""

    name = "executorch"
    devices = ("cpu",)
    section = SECTION
    default_live_form = "own-kernel"  # what `edgeadapt export` writes where a compiler is

    def unavailable(self) -> str | None:
        if importlib.util.find_spec("executorch") is None:
            return "backend 'executorch' needs: pip install executorch"
        return None

    def use_kernel(self, manifest: Manifest, device: str, mode: str, kernel: bool | None
                   ) -> bool:
        """Never chosen at load: whether a program calls edgeadapt's kernel is fixed at export
        (its live form); ConfigError for ``kernel=True``."""
        if kernel:
            raise ConfigError("kernel=True: backend 'executorch' picks no kernel at load; "
                              "whether a program calls edgeadapt's kernel is fixed at export "
                              "(--executorch-live-form)")
        return False

    def live_form(self, manifest: Manifest, kernel: bool) -> str:
        """The section's ``live_form`` (absent in bundles exported before the weight-left
        form: ``linear``)."""
        return str((manifest.executorch or {}).get("live_form") or "linear")

    def live_blocker(self, manifest: Manifest) -> str | None:
        """Where the live program calls edgeadapt's own kernel and it cannot be built or loaded
        here (no C++ compiler), while a constant program (which does not call it) exists."""
        section = manifest.executorch or {}
        if section.get("live_form") != "own-kernel" or not section.get("repack"):
            return None  # without a constant program the store's error says what to do
        from edgeadapt.runtime.backends.executorch.kernel import unavailable

        problem = unavailable()
        if problem is None:
            return None
        return (f"the live program needs edgeadapt's own kernel, which cannot be loaded here "
                f"({problem}); the constant program runs without it")

    def open_store(self, bundle_dir: Path, manifest: Manifest, *, device: str, mode: str,
                   threads: int | None, kernel: bool) -> WeightStore:
        from edgeadapt.runtime.backends.executorch.store import open_store

        return open_store(bundle_dir, manifest.to_dict(), mode=mode, threads=threads)

    def open_variant(self, bundle_dir: Path, manifest: Manifest, key: str, store: WeightStore,
                     *, device: str, threads: int | None) -> VariantRoute:
        """The variant program (its own buffers: a second program cannot alias the base's)."""
        from edgeadapt.runtime.backends.executorch.variant import EtVariantProgram

        return EtVariantProgram(bundle_dir, manifest, key)

    def open_decoder(self, bundle_dir: Path, manifest: Manifest, store: WeightStore, *,
                     device: str, threads: int | None) -> EtDecoder:
        """The KV-cache decoder (:mod:`.decoder`): the ``decode`` method of ``store``'s live
        program, reading the live buffers the engine edits. Optional in a backend:
        :func:`edgeadapt.runtime.generate.open_generator` asks for it."""
        from edgeadapt.runtime.backends.executorch.decoder import open_decoder

        return open_decoder(store, manifest)


BACKEND = ExecutorchBackend()
