"""Unfused adapters on ONNX Runtime: the variant graph's session, its branch tensors bound as
inputs (the branches' math and the validation: :mod:`edgeadapt.runtime.unfused`).

:class:`OrtVariantSession` is the variant's CPU session whose live-weight inputs are bound to
the *same* runtime-owned buffers as the fused path (aliasing OrtValues), so the two paths never
disagree; the branch tensors are overridable initializers, bound with ``bind_ortvalue_input``
on one IOBinding per calling thread and rebound after a switch.
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
    live_session,
    require_ort,
    run_bound,
    session_options,
)
from edgeadapt.runtime.store import LiveWeight
from edgeadapt.runtime.unfused import variant_spec


class OrtVariantSession:
    """A CPU session of a branch variant graph sharing the runtime's live-weight buffers.

    live: the fused store's live weights (their arrays are bound by aliasing OrtValues, never
    copied, so this session reads exactly what the base session reads). kernel: read the
    blocked32 ones with edgeadapt's own kernel, as the base session does
    (:func:`~edgeadapt.runtime.backends.onnxruntime.session.cpu_session`). ``set_branches`` is
    called with runs excluded (the runtime's exclusive lock); each thread's IOBinding rebinds
    the branch tensors when it sees a new generation.
    """

    def __init__(self, bundle_dir: Path, manifest: Manifest, key: str,
                 live: dict[str, LiveWeight], threads: int | None = None,
                 prepare_inputs: Callable[[dict], dict] | None = None, kernel: bool = False
                 ) -> None:
        ort = require_ort()
        section = variant_spec(manifest, key, SECTION)
        root = bundle_dir / manifest.variants[key].get("dir", "")
        path = root / section["file"] if (root / section["file"]).is_file() \
            else bundle_dir / section["file"]
        if not path.is_file():
            raise BundleError(f"{path}: the graph of variant {key!r} is missing")
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
        # overridable initializers (the branch tensors): name -> dims (int, or str if symbolic)
        self._branch_specs = {i.name: list(i.shape)
                              for i in self.session.get_overridable_initializers()
                              if i.type == "tensor(float)"}
        self._ort = ort
        self._branch: dict[str, object] = {}
        self._gen = 0
        self._local = threading.local()
        self._prepare_inputs = prepare_inputs or (lambda x: x)

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
        (checked first: :meth:`check_branches`). The arrays are kept alive here (their
        OrtValues alias them). Call with runs excluded. ``head`` is not needed here: this
        session reads the engine's live buffers, where the engine has already put the
        adapter's head."""
        self.check_branches(feeds, head)
        self._keep = feeds
        self._branch = {k: self._ort.OrtValue.ortvalue_from_numpy(v) for k, v in feeds.items()}
        self._gen += 1

    def _binding(self):
        loc = self._local
        b = getattr(loc, "binding", None)
        if b is None:
            b = self.session.io_binding()
            for name, value in self._values.items():
                b.bind_ortvalue_input(name, value)
            loc.binding, loc.gen = b, -1
        if loc.gen != self._gen:
            for name, value in self._branch.items():
                b.bind_ortvalue_input(name, value)
            loc.gen = self._gen
        return b

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """One forward; model inputs checked and converted as the fused store does."""
        return run_bound(self.session, self._binding(), self._prepare_inputs(inputs),
                         self.output_name)
