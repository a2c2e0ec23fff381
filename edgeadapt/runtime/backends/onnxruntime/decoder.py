"""The KV-cache decoder on ONNX Runtime (numpy + onnxruntime, no torch): the bundle's
``decoder.onnx`` (written by :mod:`edgeadapt.export.onnx_decoder`; inputs, outputs and shapes
there) in a CPU session whose live-weight inputs are bound to the *same* runtime-owned buffers
as the base graph's (aliasing OrtValues, never copied), so a switch reaches both graphs at once.

A cache is the list of the ``past_key_<i>`` / ``past_value_<i>`` arrays, (batch, kv_heads,
past, head_dim) each; :meth:`OrtDecoder.step` returns the next one (the graph's presents: the
past with the new positions appended). Callers hold the runtime's lock shared around a step.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from edgeadapt.errors import BundleError
from edgeadapt.format.manifest import Manifest
from edgeadapt.runtime.backends.onnxruntime.session import (
    live_session,
    require_ort,
    session_options,
    thread_binding,
)
from edgeadapt.runtime.store import LiveWeight


def decoder_section(manifest: Manifest) -> dict:
    """The ``"decoder"`` entry of the bundle's onnxruntime section, checked for the keys the
    session needs; BundleError naming the export that writes it."""
    section = (manifest.onnxruntime or {}).get("decoder")
    if not isinstance(section, dict):
        raise BundleError("bundle.json has no onnxruntime decoder: export the base with "
                          "`edgeadapt export base --generate`")
    try:
        layers = int(section["layers"])
        pasts, presents = section["inputs"]["past"], section["outputs"]["present"]
        ok = (isinstance(section["file"], str) and isinstance(section["weights"], dict)
              and len(pasts) == len(presents) == layers >= 1
              and all(len(p) == 2 for p in pasts + presents))
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise BundleError("bundle.json: the onnxruntime decoder entry is incomplete (file, "
                          "layers, inputs.past, outputs.present, weights); re-export with "
                          "--generate")
    return section


class OrtDecoder:
    """A CPU session of the decoder graph sharing the runtime's live-weight buffers.

    live: the fused store's live weights (bound by aliasing OrtValues, so this session reads
    what the base session reads); kernel: read the blocked32 ones with edgeadapt's own kernel,
    as the base session does. One IOBinding per calling thread, the weights bound once.
    """

    def __init__(self, bundle_dir: Path, manifest: Manifest, live: dict[str, LiveWeight],
                 threads: int | None = None, kernel: bool = False) -> None:
        ort = require_ort()
        section = decoder_section(manifest)
        path = bundle_dir / section["file"]
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
        self.session, self.kernel, self._values = live_session(
            path, session_options(threads), live, {n: entries[n]["name"] for n in live}, kernel)
        graph_inputs = {i.name: i for i in self.session.get_inputs()}
        self.ids_name = section["inputs"].get("ids", "input_ids")
        self.past_names = [n for pair in section["inputs"]["past"] for n in pair]
        self.output_names = [section["outputs"].get("logits", "logits")] + [
            n for pair in section["outputs"]["present"] for n in pair]
        missing = [n for n in [self.ids_name, *self.past_names] if n not in graph_inputs]
        if missing:
            raise BundleError(f"{path}: inputs {missing} named in bundle.json are not inputs of "
                              "the decoder graph")
        first = graph_inputs[self.past_names[0]].shape  # (batch, kv_heads, past, head_dim)
        self.kv_heads, self.head_dim = int(section["kv_heads"]), int(section["head_dim"])
        if [first[1], first[3]] != [self.kv_heads, self.head_dim]:
            raise BundleError(f"{path}: cache inputs of shape {first}, bundle.json says "
                              f"kv_heads {self.kv_heads}, head_dim {self.head_dim}")
        self._ort = ort
        self._local = threading.local()

    def empty_cache(self, batch: int = 1) -> list[np.ndarray]:
        """The cache of no positions: zero-length arrays of the cache inputs' shapes."""
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32)
                for _ in self.past_names]

    def _binding(self):
        return thread_binding(self._local, self.session, self._values)

    def step(self, ids: np.ndarray, cache: list[np.ndarray]
             ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits (batch, seq, vocab) of the new tokens ``ids`` (int64 (batch, seq)) after the
        positions in ``cache``, and the cache with them appended. The arrays returned are
        views of ONNX Runtime's outputs of this run (each run allocates new ones)."""
        b = self._binding()
        feeds = [np.ascontiguousarray(ids, dtype=np.int64),
                 *(np.ascontiguousarray(c, dtype=np.float32) for c in cache)]
        values = [self._ort.OrtValue.ortvalue_from_numpy(x) for x in feeds]  # alive for the run
        for name, value in zip([self.ids_name, *self.past_names], values, strict=True):
            b.bind_ortvalue_input(name, value)
        for name in self.output_names:
            b.bind_output(name, "cpu")
        self.session.run_with_iobinding(b)
        outs = [o.numpy() for o in b.get_outputs()]
        b.clear_binding_outputs()
        return outs[0], outs[1:]
