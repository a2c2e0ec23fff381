"""Unfused adapters on ONNX Runtime: the variant graph's session, its branch tensors bound as
inputs (the branches' math and the validation: :mod:`edgeadapt.runtime.unfused`).

:class:`OrtVariantSession` is the variant's CPU session whose live-weight inputs are bound to
the *same* runtime-owned buffers as the fused path (aliasing OrtValues), so the two paths never
disagree; the branch tensors are overridable initializers, bound with ``bind_ortvalue_input``
on one IOBinding per calling thread and rebound after a switch
(:class:`~edgeadapt.runtime.backends.onnxruntime.session.BranchTensors`). A bundle exported
with ``--generate`` also carries the variant's KV-cache decoder (``variants[key].onnxruntime
.decoder``), which :meth:`OrtVariantSession.decoder` opens on first use with the *same* branch
tensors and live buffers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgeadapt.errors import BundleError
from edgeadapt.format.manifest import Manifest
from edgeadapt.runtime.backends.onnxruntime import SECTION
from edgeadapt.runtime.backends.onnxruntime.session import (
    BranchTensors,
    branch_specs,
    live_session,
    run_bound,
    session_options,
    thread_binding,
)
from edgeadapt.runtime.store import LiveWeight
from edgeadapt.runtime.unfused import variant_spec


def variant_path(bundle_dir: Path, manifest: Manifest, key: str, file: str) -> Path:
    """Where a file of variant ``key`` lies: in the variant's ``dir`` where it records one and
    the file is there, else in the bundle's folder."""
    root = bundle_dir / manifest.variants[key].get("dir", "")
    return root / file if (root / file).is_file() else bundle_dir / file


class OrtVariantSession:
    """A CPU session of a branch variant graph sharing the runtime's live-weight buffers.

    live: the fused store's live weights (their arrays are bound by aliasing OrtValues, never
    copied, so this session reads exactly what the base session reads; a quantized weight's
    codes and scales both, the branches in float beside them). kernel: read the
    blocked32 ones with edgeadapt's own kernel, as the base session does
    (:func:`~edgeadapt.runtime.backends.onnxruntime.session.cpu_session`). ``set_branches`` is
    called with runs excluded (the runtime's exclusive lock); each thread's IOBinding rebinds
    the branch tensors when it sees a new generation.
    """

    def __init__(self, bundle_dir: Path, manifest: Manifest, key: str,
                 live: dict[str, LiveWeight], threads: int | None = None,
                 prepare_inputs: Callable[[dict], dict] | None = None, kernel: bool = False
                 ) -> None:
        section = variant_spec(manifest, key, SECTION)
        path = variant_path(bundle_dir, manifest, key, section["file"])
        if not path.is_file():
            raise BundleError(f"{path}: the graph of variant {key!r} is missing")
        base, own = ((s or {}).get("precision", "fp32") for s in (manifest.onnxruntime, section))
        if own != base:
            raise BundleError(f"variant {key!r} was exported for {own} weights, the base is "
                              f"{base}; re-export the variant (edgeadapt export adapter)")
        so = session_options(threads)
        so.log_severity_level = 3  # overridable branch initializers make ORT warn per input
        self.key = key
        vweights = manifest.variants[key].get("weights", {})
        entries = {w: (vweights.get(w) or {}).get("onnxruntime")
                   or manifest.weights[w].onnxruntime or {}
                   for w in live}  # the variant's own entry, else the base graph's
        for wname, lw in live.items():
            if entries[wname].get("layout", lw.layout) != lw.layout:
                raise BundleError(f"variant {key!r}: {wname!r} has layout "
                                  f"{entries[wname].get('layout')}, the live buffer "
                                  f"{lw.layout}; cannot share it")
        self.session, self.kernel, self._values = live_session(
            path, so, live, {w: entries[w]["name"] for w in live}, kernel)
        self.output_name = self.session.get_outputs()[0].name
        self._branch_specs = branch_specs(self.session)
        self.branches = BranchTensors()
        self._local = threading.local()
        self._prepare_inputs = prepare_inputs or (lambda x: x)
        self._opening = (bundle_dir, manifest, live, threads)
        self._decoder = None
        self._decoder_lock = threading.Lock()

    def check_branches(self, feeds: dict[str, np.ndarray],
                       head: dict[str, np.ndarray] | None = None) -> None:
        """BundleError unless every tensor of ``feeds`` is a float32 input of this graph with a
        fitting shape (symbolic dims take any size). ``head``: nothing to check here."""
        for name, value in feeds.items():
            spec = self._branch_specs.get(name)
            if spec is None or value.dtype != np.float32 or value.ndim != len(spec) or any(
                    isinstance(d, int) and d != n
                    for d, n in zip(spec, value.shape, strict=True)):
                raise BundleError(f"variant {self.key!r}: branch input {name!r} "
                                  f"{'absent' if spec is None else spec} cannot take "
                                  f"{value.dtype} {value.shape}")

    def set_branches(self, feeds: dict[str, np.ndarray],
                     head: dict[str, np.ndarray] | None = None) -> None:
        """Make ``feeds`` (graph input name -> float32 tensor) the branch tensors of later runs
        of this session and of its decoder (checked first: :meth:`check_branches`). Call with
        runs excluded. ``head`` is not needed here: this session reads the engine's live
        buffers, where the engine has already put the adapter's head."""
        self.check_branches(feeds, head)
        self.branches.set(feeds)

    def _binding(self):
        b = thread_binding(self._local, self.session, self._values)
        self.branches.bind(self._local, b)
        return b

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """One forward; model inputs checked and converted as the fused store does."""
        return run_bound(self.session, self._binding(), self._prepare_inputs(inputs),
                         self.output_name)

    def decoder(self):
        """The variant's KV-cache decoder (:class:`~edgeadapt.runtime.backends.onnxruntime.
        decoder.OrtDecoder` over ``variants[key].onnxruntime.decoder``), opened on first use:
        the live buffers and the branch tensors of this session, read the same way (kernel or
        MatMul). SwitchError where the bundle records none (re-export the variant); BundleError
        where its branch inputs are not this graph's."""
        from edgeadapt.runtime.backends.onnxruntime.decoder import OrtDecoder

        with self._decoder_lock:  # opened once, by whichever conversation steps first
            if self._decoder is None:
                bundle_dir, manifest, live, threads = self._opening
                dec = OrtDecoder(bundle_dir, manifest, live, threads, kernel=self.kernel,
                                 variant=self.key, branches=self.branches)
                if branch_specs(dec.session) != self._branch_specs:
                    raise BundleError(f"variant {self.key!r}: the decoder's branch inputs "
                                      f"{sorted(branch_specs(dec.session))} are not the "
                                      "forward graph's; re-export the variant")
                self._decoder = dec
        return self._decoder
