"""The KV-cache decoder on the device store's execution provider (CUDA; the CPU execution
provider in the stand-in, tests/cuda_standin.py), numpy + onnxruntime(-gpu), torch only where
the store binds torch buffers.

The same ``decoder.onnx`` as the CPU decoder (:mod:`.decoder`) in a session of the store's
provider, its live-weight inputs bound to the store's *device* buffers (those
:meth:`~edgeadapt.runtime.backends.onnxruntime.cuda.OrtDeviceStore.commit` writes a switch's
changes into, shared with the forward session), so a switch reaches both graphs with one
commit. Each conversation's cache is one device buffer per past/present pair, the whole
context long (zeros, allocated once: growing would need a copy on the device), bound as both
past and present so GroupQueryAttention writes the new positions in place; the token ids and
the logits cross to and from the host each step.

Steps hold the runtime's lock shared (``optimistic = False``): a commit copies into the very
buffers a running step reads, so a switch waits for the step in flight (one decode step).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeadapt.errors import ConfigError
from edgeadapt.format.manifest import Manifest
from edgeadapt.runtime.backends.onnxruntime.decoder import (
    FIRST_CAPACITY,
    KVCache,
    OneToken,
    OrtDecoder,
)
from edgeadapt.runtime.backends.onnxruntime.session import open_session, thread_binding
from edgeadapt.runtime.store import LiveWeight


class DeviceCache(KVCache):
    """A conversation's cache in device buffers (OrtValues, (1, kv_heads, capacity,
    head_dim)); ``arrays``: the host arrays they alias on the stand-in's CPU provider (kept
    alive), [] on a device."""

    def __init__(self, values: list, arrays: list[np.ndarray], vocab: int) -> None:
        self.arrays, self.values = arrays, values
        self.length = 0
        self.one = OneToken(vocab)

    @property
    def capacity(self) -> int:
        return self.values[0].shape()[2]


class OrtDeviceDecoder(OrtDecoder):
    """The decoder graph on ``store``'s execution provider, reading its device buffers (module
    docstring). ``store``: an :class:`~edgeadapt.runtime.backends.onnxruntime.cuda.
    OrtDeviceStore`."""

    optimistic = False

    def __init__(self, bundle_dir: Path, manifest: Manifest, store, threads: int | None = None
                 ) -> None:
        self._store = store
        super().__init__(bundle_dir, manifest, store.live_weights(), threads, kernel=False)
        self._capacity = self.max_context or FIRST_CAPACITY

    def _open_session(self, path: Path, so, live: dict[str, LiveWeight],
                      names: dict[str, str], kernel: bool) -> tuple[object, bool, dict]:
        store = self._store
        session = open_session(str(path), so, path, store.providers())
        store.check_provider(session)
        self._names = names
        return session, False, {}

    def _binding(self):
        return thread_binding(self._local, self.session, {},
                              lambda b: self._store.bind_weights(b, self._names))

    def empty_cache(self, batch: int = 1) -> DeviceCache:
        """A cache holding no positions, its buffers the whole context long on the device."""
        if batch != 1:
            raise ConfigError(f"batch {batch}: the decoder runs one conversation per cache")
        shape = (1, self.kv_heads, self._capacity, self.head_dim)
        store, ort = self._store, self._ort
        host = [np.zeros(shape, np.float32) for _ in self.past_names]
        values = [ort.OrtValue.ortvalue_from_numpy(a, store.device, store.device_id)
                  for a in host]
        return DeviceCache(values, host if store.device == "cpu" else [], self.vocab)

    def _reserve(self, cache: KVCache, needed: int) -> None:
        if needed > cache.capacity:
            raise ConfigError(f"decoder step: {needed} positions; the cache holds "
                              f"{cache.capacity} (the bundle's max_context)")
