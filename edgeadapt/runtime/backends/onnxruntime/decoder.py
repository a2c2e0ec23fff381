"""The KV-cache decoder on ONNX Runtime (numpy + onnxruntime, no torch): the bundle's
``decoder.onnx`` (written by :mod:`edgeadapt.export.onnx_decoder`; inputs, outputs and shapes
there) in a CPU session whose live-weight inputs are bound to the *same* runtime-owned buffers
as the base graph's (aliasing OrtValues, never copied), so a switch reaches both graphs at once.

A cache (:class:`KVCache`, one per conversation) is one buffer per ``past_key_<i>`` /
``past_value_<i>`` input, (1, kv_heads, capacity, head_dim) each, bound to the graph as both
the past and the present, so ONNX Runtime's GroupQueryAttention writes the new positions into
it in place: a step copies no cache. The capacity starts at :data:`FIRST_CAPACITY` positions
and doubles (the held positions copied over) up to the bundle's ``max_context`` as the
conversation grows. Callers hold the runtime's lock shared around a step.

A graph variant's decoder (``variants[key].onnxruntime.decoder``: the same graph with the
variant's branches, written by ``edgeadapt export adapter`` for a ``--generate`` bundle) is an
:class:`OrtDecoder` too, its branch tensors bound from the variant's forward session
(:meth:`edgeadapt.runtime.backends.onnxruntime.variant.OrtVariantSession.decoder`).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from edgeadapt.errors import BundleError, ConfigError, SwitchError
from edgeadapt.format.manifest import Manifest
from edgeadapt.runtime.backends.onnxruntime import SECTION
from edgeadapt.runtime.backends.onnxruntime.session import (
    BranchTensors,
    live_session,
    require_ort,
    session_options,
    thread_binding,
)
from edgeadapt.runtime.generate import check_keep
from edgeadapt.runtime.locks import Window
from edgeadapt.runtime.store import LiveWeight

#: the cache form this session runs (bundle.json ``onnxruntime.decoder.cache``: buffers of any
#: length >= past + seq, written in place where bound as both past and present; the export:
#: edgeadapt.export.onnx_decoder)
CACHE_FORM = "shared-buffer"


#: cache positions a new conversation's buffers hold before they first grow
FIRST_CAPACITY = 256


class OneToken:
    """A cache's feeds for one-token steps: the token, ``past_length``, ``logits_to_keep`` and
    the logits (1, 1, vocab), arrays a thread's IOBinding binds once (:meth:`OrtDecoder.step`
    writes the values in place). Fresh inputs and a fresh logits array each step cost a decode
    step about 0.1 ms of binding calls and allocation."""

    def __init__(self, vocab: int) -> None:
        self.ids = np.zeros((1, 1), np.int64)
        self.length = np.zeros((), np.int64)
        self.keep = np.zeros((), np.int64)
        self.logits = np.empty((1, 1, vocab), np.float32)


class KVCache:
    """One conversation's cache buffers (module docstring): ``length`` positions held; ``one``:
    its one-token feeds (:class:`OneToken`)."""

    def __init__(self, arrays: list[np.ndarray], ort: object, vocab: int) -> None:
        self.arrays = arrays
        self.values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]  # aliasing
        self.length = 0
        self.one = OneToken(vocab)

    @property
    def capacity(self) -> int:
        return self.arrays[0].shape[2]


def decoder_section(manifest: Manifest, variant: str | None = None) -> dict:
    """The ``"decoder"`` entry of the bundle's onnxruntime section (of graph variant
    ``variant``'s where given), checked for the keys the session needs; BundleError naming the
    export that writes it (SwitchError for a variant recorded without one: generation with its
    adapters needs the variant re-exported)."""
    if variant is None:
        section = (manifest.onnxruntime or {}).get("decoder")
        if not isinstance(section, dict):
            raise BundleError("bundle.json has no onnxruntime decoder: export the base with "
                              "`edgeadapt export base --generate`")
    else:
        section = ((manifest.variants.get(variant) or {}).get(SECTION) or {}).get("decoder")
        if not isinstance(section, dict):
            raise SwitchError(
                f"generate: graph variant {variant!r} has no KV-cache decoder (exported before "
                "variants generated, or without --generate): re-export the variant, e.g. "
                "`edgeadapt export adapter RUN --bundle BUNDLE --name NAME` for one of its "
                "adapters, which adds the decoder; until then switch to a fused adapter")
    try:
        layers = int(section["layers"])
        pasts, presents = section["inputs"]["past"], section["outputs"]["present"]
        ok = (section.get("cache") == CACHE_FORM
              and isinstance(section["file"], str) and isinstance(section["weights"], dict)
              and len(pasts) == len(presents) == layers >= 1
              and all(len(p) == 2 for p in pasts + presents))
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise BundleError("bundle.json: the onnxruntime decoder entry is incomplete or of an "
                          f"older form (file, layers, cache {CACHE_FORM!r}, inputs.past, "
                          "outputs.present, weights); re-export with --generate")
    return section


class OrtDecoder:
    """A CPU session of the decoder graph sharing the runtime's live-weight buffers.

    live: the fused store's live weights (bound by aliasing OrtValues, so this session reads
    what the base session reads); kernel: read the blocked32 ones with edgeadapt's own kernel,
    as the base session does. One IOBinding per calling thread, the weights bound once.
    variant, branches: graph variant ``variant``'s decoder, its branch tensors ``branches``
    (those its forward session binds, rebound when they change).
    """

    #: a switch edits the bound live buffers in place and never frees, moves or repacks them,
    #: so a step of the fused decoder may run while one writes (the generator redoes such a
    #: step: runtime/generate.py); a variant's runs are held shared (branches are rebound)
    optimistic = True

    def __init__(self, bundle_dir: Path, manifest: Manifest, live: dict[str, LiveWeight],
                 threads: int | None = None, kernel: bool = False, *,
                 variant: str | None = None, branches: BranchTensors | None = None) -> None:
        ort = require_ort()
        section = decoder_section(manifest, variant)
        if variant is None:
            path = bundle_dir / section["file"]
        else:
            from edgeadapt.runtime.backends.onnxruntime.variant import variant_path

            path = variant_path(bundle_dir, manifest, variant, section["file"])
        if not path.is_file():
            raise BundleError(f"{path}: the bundle's decoder graph is missing")
        entries = section["weights"]
        if set(entries) != set(live):
            raise BundleError(f"{path}: the decoder's live weights {sorted(entries)} are not the "
                              f"bundle's {sorted(live)}; re-export with --generate")
        for name, lw in live.items():
            if entries[name].get("layout") != lw.layout:
                raise BundleError(f"{path}: {name!r} has layout {entries[name].get('layout')} "
                                  f"in the decoder, the live buffer {lw.layout}; cannot share it")
        # a decode step is ~150 small parallel sections: threads that spin between them take
        # the cores from every other conversation and session, so they sleep instead, as
        # onnxruntime-genai's do
        so = session_options(threads, {"session.intra_op.allow_spinning": "0"})
        if variant is not None:
            so.log_severity_level = 3  # overridable branch initializers make ORT warn per input
        self.session, self.kernel, self._values = self._open_session(
            path, so, live, {n: entries[n]["name"] for n in live}, kernel)
        self.variant, self._branches = variant, branches
        graph_inputs = {i.name: i for i in self.session.get_inputs()}
        self.ids_name = section["inputs"].get("ids", "input_ids")
        self.length_name = section["inputs"].get("past_length", "past_length")
        self.past_names = [n for pair in section["inputs"]["past"] for n in pair]
        self.present_names = [n for pair in section["outputs"]["present"] for n in pair]
        self.logits_name = section["outputs"].get("logits", "logits")
        # older bundles compute every position's logits (the step slices them)
        self.keep_name = section["inputs"].get("logits_to_keep")
        missing = [n for n in [self.ids_name, self.length_name, *self.past_names,
                               *([self.keep_name] if self.keep_name else [])]
                   if n not in graph_inputs]
        if missing:
            raise BundleError(f"{path}: inputs {missing} named in bundle.json are not inputs of "
                              "the decoder graph")
        first = graph_inputs[self.past_names[0]].shape  # (batch, kv_heads, cache, head_dim)
        self.kv_heads, self.head_dim = int(section["kv_heads"]), int(section["head_dim"])
        if [first[1], first[3]] != [self.kv_heads, self.head_dim]:
            raise BundleError(f"{path}: cache inputs of shape {first}, bundle.json says "
                              f"kv_heads {self.kv_heads}, head_dim {self.head_dim}")
        self.max_context = int(manifest.extra.get("generate", {}).get("max_context", 0)) or None
        logits = [o for o in self.session.get_outputs() if o.name == self.logits_name]
        if not logits:
            raise BundleError(f"{path}: output {self.logits_name!r} named in bundle.json is not "
                              "an output of the decoder graph")
        vocab = logits[0].shape[-1]
        self.vocab = vocab if isinstance(vocab, int) else int(manifest.extra["generate"][
            "vocab_size"])
        self._ort = ort
        self._local = threading.local()

    def _open_session(self, path: Path, so, live: dict[str, LiveWeight],
                      names: dict[str, str], kernel: bool) -> tuple[object, bool, dict]:
        """(session, whether edgeadapt's kernel reads the live weights, {input name: OrtValue
        bound once per thread}): a CPU session reading ``live`` in place, and every constant
        through edgeadapt's kernel too (a decode step is one token, where it streams a weight
        faster than MLAS: graphs/blocked.py, kernel_blocked_matmuls)."""
        return live_session(path, so, live, names, kernel, every_constant=True)

    def empty_cache(self, batch: int = 1) -> KVCache:
        """A cache holding no positions (buffers of :data:`FIRST_CAPACITY` positions, or the
        whole context where that is less)."""
        if batch != 1:
            raise ConfigError(f"batch {batch}: the decoder runs one conversation per cache")
        return KVCache(self._buffers(min(FIRST_CAPACITY, self.max_context or FIRST_CAPACITY)),
                       self._ort, self.vocab)

    def _buffers(self, capacity: int) -> list[np.ndarray]:
        return [np.zeros((1, self.kv_heads, capacity, self.head_dim), np.float32)
                for _ in self.past_names]

    def _reserve(self, cache: KVCache, needed: int) -> None:
        """Grow ``cache`` to hold ``needed`` positions: twice the capacity (at most the
        context), the held positions copied over."""
        if needed <= cache.capacity:
            return
        capacity = max(needed, 2 * cache.capacity)
        if self.max_context is not None:
            capacity = max(needed, min(capacity, self.max_context))
        grown = self._buffers(capacity)
        for new, old in zip(grown, cache.arrays, strict=True):
            new[:, :, :cache.length] = old[:, :, :cache.length]
        cache.arrays = grown
        cache.values = [self._ort.OrtValue.ortvalue_from_numpy(a) for a in grown]

    def _binding(self):
        """The calling thread's IOBinding: the live weights bound once; the cache buffers of
        the last conversation it stepped stay bound (``_local.cache``, those buffers' values)
        until it steps another."""
        b = thread_binding(self._local, self.session, self._values)
        if self._branches is not None:
            self._branches.bind(self._local, b)
        return b

    def step(self, ids: np.ndarray, cache: KVCache, window: Window | None = None, *,
             keep: int = 0) -> tuple[np.ndarray, KVCache]:
        """Logits (1, seq, vocab) of the new tokens ``ids`` (int64 (1, seq)) after the
        ``cache.length`` positions of ``cache``, whose buffers receive the new positions in
        place (``cache`` is returned, its length advanced); with ``keep`` k >= 1 those of the
        last k tokens only, (1, min(k, seq), vocab), which the graph's head computes alone
        (``logits_to_keep``; an older bundle's graph computes all and they are sliced). The
        logits are bound as the graph's output: a new array each run of several tokens, and
        for one token the cache's own (``cache.one.logits``), which its next one-token step
        overwrites.

        window: an optimistic run's window (:meth:`~edgeadapt.runtime.locks.ReadWriteLock.
        optimistic`): a switch that begins during the run terminates it (``RunOptions.
        terminate``; ONNX Runtime stops between nodes and raises), its result being void
        anyway; the caller drops the cache (partly written) and redoes the step."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[0] != 1:
            raise ConfigError(f"decoder step: ids of shape {ids.shape}; one conversation "
                              "(batch 1) per step")
        check_keep(keep)
        self._reserve(cache, cache.length + ids.shape[1])
        b = self._binding()
        if ids.shape[1] == 1:  # a decode step: the cache's one-token feeds, bound once
            one = cache.one
            one.ids[0, 0], one.length[()], one.keep[()] = ids[0, 0], cache.length, keep
            logits = one.logits
            if getattr(self._local, "one", None) is not one:
                self._bind_feeds(b, one.ids, one.length, one.keep, logits)
                self._local.one = one
        else:
            # the logits into an array of ours: get_outputs() would wrap every bound output
            rows = min(keep, ids.shape[1]) if keep and self.keep_name else ids.shape[1]
            logits = np.empty((1, rows, self.vocab), np.float32)
            self._bind_feeds(b, ids, np.array(cache.length, np.int64), np.array(keep, np.int64),
                             logits)
            self._local.one = None
        if getattr(self._local, "cache", None) is not cache.values:  # it bound another last
            for past, present, value in zip(self.past_names, self.present_names, cache.values,
                                            strict=True):
                b.bind_ortvalue_input(past, value)
                b.bind_ortvalue_output(present, value)
            self._local.cache = cache.values
        options = None
        if window is not None:
            options = self._ort.RunOptions()
            # onnxruntime's Python run_with_iobinding looks this key up in every RunOptions, and
            # a missing key costs it a raised and caught exception on every step; -1 is
            # its own "no graph capture", what a CPU session does anyway
            options.add_run_config_entry("gpu_graph_id", "-1")
            window.on_cancel(lambda: setattr(options, "terminate", True))
        try:
            self.session.run_with_iobinding(b, options)
        except Exception:
            b.clear_binding_outputs()
            self._local.cache = self._local.one = None
            raise
        cache.length += ids.shape[1]
        return (logits[:, -keep:] if keep else logits), cache

    def _bind_feeds(self, b, ids: np.ndarray, length: np.ndarray, keep: np.ndarray,
                    logits: np.ndarray) -> None:
        b.bind_cpu_input(self.ids_name, ids)
        b.bind_cpu_input(self.length_name, length)
        if self.keep_name:
            b.bind_cpu_input(self.keep_name, keep)
        b.bind_output(self.logits_name, "cpu", 0, np.float32, logits.shape, logits.ctypes.data)
