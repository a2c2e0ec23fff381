"""The ONNX Runtime backend (numpy + onnxruntime, no torch): ``load(bundle,
backend="onnxruntime", device="cpu" | "cuda")``.

- ``store.py``: the CPU stores, live (weights bound as graph inputs) and repack (constant
  weights, a rebuild per switch); ``cuda.py``: the CUDA store (device buffers bound by pointer)
  and its CPU stand-in.
- ``session.py``: session options, the kernel's graph rewrite at load, constant sessions.
- ``kernel.py``: edgeadapt's own op ``edgeadapt.BlockedMatMul``, built where a compiler and
  ONNX Runtime's headers are present.
- ``variant.py``: unfused adapters through a graph variant's session.
- ``decoder.py``: the KV-cache decoder that generation steps (bundles exported with
  ``--generate``), bound to the store's live buffers.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from edgeadapt.errors import ConfigError, SwitchError
from edgeadapt.format.layout import BLOCKED
from edgeadapt.format.manifest import Manifest
from edgeadapt.runtime.store import WeightStore
from edgeadapt.runtime.unfused import VariantRoute

#: the bundle.json section holding the ONNX graphs (the base's and each variant's)
SECTION = "onnxruntime"


def _layouts(manifest: Manifest) -> set[str]:
    return {(w.onnxruntime or {}).get("layout") for w in manifest.weights.values()}


class OnnxRuntimeBackend:
    """:class:`edgeadapt.runtime.backends.Backend` for ONNX Runtime."""

    name = "onnxruntime"
    devices = ("cpu", "cuda")
    section = SECTION
    default_live_form = "blocked32"  # what `edgeadapt export` writes for MatMul-read weights

    def unavailable(self) -> str | None:
        if importlib.util.find_spec("onnxruntime") is None:
            return "backend 'onnxruntime' needs: pip install onnxruntime (onnxruntime-gpu for CUDA)"
        return None

    def use_kernel(self, manifest: Manifest, device: str, mode: str, kernel: bool | None
                   ) -> bool:
        """Edgeadapt's kernel reads the blocked32 live weights of CPU live sessions where it
        can be built (``kernel`` None), always (True: ConfigError if it cannot be) or never."""
        if device != "cpu":
            if kernel:
                raise ConfigError("kernel=True: edgeadapt's ONNX Runtime kernel runs on "
                                  "backend='onnxruntime', device='cpu' only")
            return False
        if mode == "repack" and not kernel:
            return False  # repack sessions never read through it: build it only for live mode
        from edgeadapt.runtime.backends.onnxruntime.kernel import use_kernel

        return use_kernel(kernel, _layouts(manifest))

    def live_form(self, manifest: Manifest, kernel: bool) -> str:
        """``own-kernel`` where the kernel reads the live weights, else ``blocked32`` when any
        live weight has that layout, else ``transposed``."""
        if kernel:
            return "own-kernel"
        return "blocked32" if BLOCKED in _layouts(manifest) else "transposed"

    def live_blocker(self, manifest: Manifest) -> str | None:
        return None  # live mode runs wherever the bundle loads

    def open_store(self, bundle_dir: Path, manifest: Manifest, *, device: str, mode: str,
                   threads: int | None, kernel: bool) -> WeightStore:
        from edgeadapt.runtime.backends.onnxruntime.store import open_store

        return open_store(bundle_dir, manifest, device=device, mode=mode, threads=threads,
                          kernel=kernel)

    def open_variant(self, bundle_dir: Path, manifest: Manifest, key: str, store: WeightStore,
                     *, device: str, threads: int | None) -> VariantRoute:
        """The variant's CPU session, bound to ``store``'s live buffers and reading them as the
        base session does (kernel or MatMul)."""
        if device != "cpu":
            raise SwitchError(f"unfused adapters (graph variant {key!r}) run on device='cpu' "
                              "only so far")
        from edgeadapt.runtime.backends.onnxruntime.variant import OrtVariantSession

        return OrtVariantSession(bundle_dir, manifest, key, store.live_weights(), threads,
                                 store.prepare_inputs, kernel=store.kernel)

    def open_decoder(self, bundle_dir: Path, manifest: Manifest, store: WeightStore, *,
                     device: str, threads: int | None):
        """The KV-cache decoder's CPU session (:mod:`.decoder`), bound to ``store``'s live
        buffers and reading them as the base session does (kernel or MatMul); on a device
        store (CUDA, and its CPU stand-in) the store's own (:mod:`.device_decoder`). Optional
        in a backend: :func:`edgeadapt.runtime.generate.open_generator` asks for it."""
        on_device = getattr(store, "open_decoder", None)
        if on_device is not None:
            return on_device(bundle_dir, manifest, threads)
        if device != "cpu":
            raise ConfigError(f"generation on device={device!r} needs the device store "
                              "(live mode)")
        from edgeadapt.runtime.backends.onnxruntime.decoder import OrtDecoder

        return OrtDecoder(bundle_dir, manifest, store.live_weights(), threads,
                          kernel=store.kernel)


BACKEND = OnnxRuntimeBackend()
