"""The KV-cache decoder on ExecuTorch: the ``decode`` method of the live program ``model.pte``
(written by :mod:`edgeadapt.export.executorch_decoder`; inputs and math there), loaded from the
*same* program as the store's ``forward``, so it reads the live-weight buffers the switch engine
edits: a switch reaches it at no extra cost.

The cache is the program's own: per layer a key and a value buffer ``(1, kv_heads,
max_context, head_dim)`` that ``decode`` writes in place at the new positions. It holds one
conversation at a time, the *resident* one. A conversation's cache object (:class:`EtCache`) is
a handle: the conversation's :class:`_Contents` and how many positions it holds. Stepping a
conversation that is not resident first moves the resident one's used prefix
(``[:, :, :length]`` of every buffer) out to host arrays and moves its own saved prefix in:
``2 * layers * kv_heads * length * head_dim`` floats each way, measured against re-prefilling
in docs/generate.md. A conversation no longer referenced is never saved (weak reference).

Runs of one ExecuTorch program serialize (its methods share one set of planned arenas); a lock
here keeps a move and the step that needs it together. Where the store's program runs on
edgeadapt's native runner (:mod:`.programs`: the GIL released for the run) the decoder is
``optimistic``: a switch writes the live buffers while a step runs, never waiting for it, and
the generator drops and redoes a step a switch overlapped (:mod:`edgeadapt.runtime.generate`).
ExecuTorch cannot stop a run midway, so such a step runs to its end first. On ExecuTorch's
Python runtime (the fallback) a run holds the GIL, which a switch needs anyway, so callers hold
the runtime's lock shared around a step instead.
"""

from __future__ import annotations

import threading
import weakref

import numpy as np

from edgeadapt.errors import BundleError, ConfigError
from edgeadapt.format.manifest import Manifest
from edgeadapt.runtime.backends.executorch import SECTION
from edgeadapt.runtime.backends.executorch.store import ExecutorchStore
from edgeadapt.runtime.generate import check_keep
from edgeadapt.runtime.locks import Window


def decoder_section(manifest: Manifest) -> dict:
    """The ``"decoder"`` entry of the bundle's executorch section, checked for the keys the
    decoder needs; BundleError naming the export that writes it."""
    section = (manifest.executorch or {}).get("decoder")
    if not isinstance(section, dict):
        raise BundleError("bundle.json has no executorch decoder: export the base with "
                          "`edgeadapt export base --backends executorch --generate`")
    try:
        layers = int(section["layers"])
        ok = (isinstance(section["method"], str) and layers >= 1
              and len(section["cache"]) == layers and all(len(p) == 2 for p in section["cache"])
              and int(section["max_context"]) >= 2 and int(section["max_chunk"]) >= 1
              and int(section["kv_heads"]) >= 1 and int(section["head_dim"]) >= 1)
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise BundleError(f"bundle.json: the {SECTION} decoder entry is incomplete (method, "
                          "cache, layers, kv_heads, head_dim, max_context, max_chunk); re-export "
                          "with --generate")
    return section


class _Contents:
    """What one conversation's cache holds: ``length`` positions, in the program's buffers
    while it is resident, else in ``saved`` (host copies of each buffer's used prefix); and
    the handles on it still referenced."""

    __slots__ = ("length", "saved", "handles", "__weakref__")

    def __init__(self) -> None:
        self.length = 0
        self.saved: list[np.ndarray] | None = None
        self.handles: weakref.WeakSet[EtCache] = weakref.WeakSet()


class EtCache:
    """A conversation's cache: its contents and the positions of them this handle covers (a
    step returns a new handle; the conversation keeps the latest). A step from a handle
    rewrites the positions after it, so every longer handle on the same contents is
    ``valid = False`` from then on."""

    __slots__ = ("contents", "length", "owner", "valid", "__weakref__")

    def __init__(self, owner: EtDecoder, contents: _Contents, length: int) -> None:
        self.owner, self.contents, self.length, self.valid = owner, contents, length, True
        contents.handles.add(self)


class EtDecoder:
    """The ``decode`` method of ``store``'s program and its cache buffers.

    store: a live-mode :class:`ExecutorchStore` of the bundle's ``model.pte``; section: the
    bundle's ``executorch.decoder`` entry. ConfigError for a repack store (its program is the
    all-constant one, without the decoder), BundleError for a program that does not match the
    entry. ``optimistic`` (module docstring): the store's program releases the GIL as it runs.
    """

    def __init__(self, store: ExecutorchStore, section: dict) -> None:
        if store.mode != "live":
            raise ConfigError("generation on ExecuTorch needs mode='live': the decoder is a "
                              "method of the live program (repack mode loads the constant one)")
        #: a switch edits the live buffers in place and never frees, moves or repacks them; a
        #: step may run while one writes where the run does not hold the GIL the switch needs
        self.optimistic = store.releases_gil
        self.method = store.method(section["method"])
        #: the runner's pause of a run a switch voids (native_runner.RunnerProgram.hold); None
        #: on ExecuTorch's Python runtime, whose runs are not optimistic
        self._hold = getattr(getattr(self.method, "program", None), "hold", None)
        self.kv_heads, self.head_dim = int(section["kv_heads"]), int(section["head_dim"])
        self.max_context, self.max_chunk = int(section["max_context"]), int(section["max_chunk"])
        #: the program takes ``keep`` (its length: how many of the last positions' logits it
        #: computes); an older bundle's computes every position's (sliced after the run)
        self._keeps = "keep" in section.get("inputs", ())
        self._keep = np.zeros(self.max_chunk, np.int64)
        shape = (1, self.kv_heads, self.max_context, self.head_dim)
        self._buffers = [store.buffer(name, self.method) for pair in section["cache"]
                         for name in pair]
        for name, arr in zip([n for p in section["cache"] for n in p], self._buffers,
                             strict=True):
            if arr.shape != shape or arr.dtype != np.float32:
                raise BundleError(f"ExecuTorch decoder: cache buffer {name!r} is {arr.dtype} "
                                  f"{arr.shape}, bundle.json says float32 {shape}")
            arr[...] = 0.0  # planned memory starts undefined; masked positions must be finite
        self._positions = np.arange(self.max_context, dtype=np.int64)
        self._resident: weakref.ref[_Contents] | None = None
        self._lock = threading.Lock()

    def empty_cache(self, batch: int = 1) -> EtCache:
        """A cache of no positions (batch 1: the program's cache holds one sequence)."""
        if batch != 1:
            raise ConfigError(f"the ExecuTorch decoder takes batch 1 (one conversation per "
                              f"cache), not {batch}")
        return EtCache(self, _Contents(), 0)

    def step(self, ids: np.ndarray, cache: EtCache, window: Window | None = None, *,
             keep: int = 0) -> tuple[np.ndarray, EtCache]:
        """Logits (1, seq, vocab) of ``ids`` (int64 (1, seq), seq <= ``max_chunk``) after the
        positions of ``cache``, and the cache with them appended; with ``keep`` k >= 1 those of
        the last k tokens only, which the program computes alone (one exported before its
        ``keep`` input computes all: sliced here). ConfigError (nothing run) for
        another decoder's cache, a superseded one, or ids that do not fit: at most
        ``max_context - 1`` positions are ever fed (the last token of a full context is
        sampled, never fed back). ``window``: the optimistic run's window: a switch that begins
        during the run holds the program (edgeadapt's runner pauses the run before its next
        instruction until the write ends; ExecuTorch cannot abandon it part way), and the
        caller drops the torn step's results."""
        if not isinstance(cache, EtCache) or cache.owner is not self:
            raise ConfigError("ExecuTorch decoder: this cache was not made by this decoder "
                              "(empty_cache)")
        check_keep(keep)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        seq = ids.shape[1] if ids.ndim == 2 else 0
        total = cache.length + seq
        if ids.ndim != 2 or ids.shape[0] != 1 or not 1 <= seq <= self.max_chunk \
                or total > self.max_context - 1:
            raise ConfigError(f"ExecuTorch decoder: ids of shape {ids.shape} after "
                              f"{cache.length} cached positions; it takes (1, 1..{self.max_chunk})"
                              f" and at most {self.max_context - 1} positions in all")
        with self._lock:
            contents = cache.contents
            if not cache.valid:
                raise ConfigError("ExecuTorch decoder: this cache was superseded (a step was "
                                  "taken from an earlier one of the same conversation)")
            for other in list(contents.handles):
                other.valid = other.valid and other.length <= cache.length
            self._make_resident(contents, cache.length)
            if window is not None and self._hold is not None:
                window.on_cancel(self._hold)
            kept = min(keep, seq) if keep else seq
            inputs = [ids, self._positions[:total]]
            logits = self.method.execute([*inputs, self._keep[:kept]] if self._keeps
                                         else inputs)[0]
            contents.length = total
        return (logits[:, -kept:] if logits.shape[1] != kept else logits), \
            EtCache(self, contents, total)

    def _make_resident(self, contents: _Contents, length: int) -> None:
        """Bring ``contents`` (its first ``length`` positions) into the program's buffers,
        saving the resident conversation's used prefix first if it is still referenced."""
        resident = self._resident() if self._resident is not None else None
        if resident is contents:
            contents.length = length
            return
        if resident is not None and resident.length:
            resident.saved = [b[:, :, :resident.length].copy() for b in self._buffers]
        if length:
            if contents.saved is None:
                raise BundleError("ExecuTorch decoder: a cache lost its contents")
            for buf, saved in zip(self._buffers, contents.saved, strict=True):
                buf[:, :, :length] = saved[:, :, :length]
        contents.saved, contents.length = None, length
        self._resident = weakref.ref(contents)


def open_decoder(store: ExecutorchStore, manifest: Manifest) -> EtDecoder:
    """The decoder of a loaded bundle (the backend's ``open_decoder``)."""
    return EtDecoder(store, decoder_section(manifest))
