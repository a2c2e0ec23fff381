"""``edgeadapt.runtime.load(bundle)`` -> :class:`Runtime`: switch adapters in place, run.

    rt = load("bundle/", backend="onnxruntime", device="cpu", mode="auto")
    rt.switch("sentiment")                              # fused, in place
    rt.switch(["sentiment", "politics"], scales=[1.0, 0.5])
    rt.switch(None)                                     # the base, bit for bit
    logits = rt.run(input_ids=ids, attention_mask=mask)

The ONNX Runtime path imports no torch. Errors are typed (edgeadapt.errors) and a refused
switch leaves the weights exactly as they were.
"""

from __future__ import annotations

import importlib
import math
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgeadapt.errors import ConfigError, SwitchError, UnknownNameError
from edgeadapt.format.adapter_file import read_adapter
from edgeadapt.format.manifest import Manifest, read_manifest
from edgeadapt.runtime.engine import PreparedAdapter, SwitchEngine, WeightStore

BACKENDS = ("onnxruntime", "executorch")
MODES = ("live", "repack", "auto")
#: auto picks repack when a switch is followed by at least this many runs at batch >= 8:
#: live q/v weights cost ~1-4% per forward (docs/runtime.md) while a rebuild costs about
#: 20-40 forwards, so below this the rebuild is never paid back.
REPACK_MIN_RUNS_PER_SWITCH = 1000
REPACK_MIN_BATCH = 8


def choose_mode(runs_per_switch: float | None, batch: int | None) -> tuple[str, str]:
    """The ``auto`` policy: (mode, reason).

    Unpacked weights cost nothing at batch 1 (matrix-vector kernels do not pack) and a few
    percent at larger batches when only the adapted weights are live, while repacking costs a
    session/program rebuild per switch; so repack only for large batches with many runs per
    switch.
    """
    if runs_per_switch is None or batch is None:
        return "live", "auto: no workload given (runs_per_switch, batch); live is never stale " \
                       "and switches in microseconds"
    if batch >= REPACK_MIN_BATCH and runs_per_switch >= REPACK_MIN_RUNS_PER_SWITCH:
        return "repack", (f"auto: batch {batch} >= {REPACK_MIN_BATCH} and {runs_per_switch:g} "
                          f"runs per switch >= {REPACK_MIN_RUNS_PER_SWITCH}: packed weights "
                          "repay the rebuild")
    return "live", (f"auto: batch {batch}, {runs_per_switch:g} runs per switch: a rebuild per "
                    "switch would cost more than unpacked live weights")


def _open_store(backend: str, bundle_dir: Path, manifest: Manifest, device: str, mode: str,
                threads: int | None) -> WeightStore:
    if backend not in BACKENDS:
        raise UnknownNameError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    module = importlib.import_module(f"edgeadapt.runtime.{backend}_backend")
    if backend == "executorch":
        if device != "cpu":
            raise ConfigError("backend 'executorch' runs on device='cpu' only")
        return module.open_store(bundle_dir, manifest.to_dict(), mode=mode)
    return module.open_store(bundle_dir, manifest, device=device, mode=mode, threads=threads)


class Runtime:
    """A loaded bundle whose live weights are switched in place. Thread-safe: ``run`` may be
    called from many threads while another thread switches; a run sees the old or the new
    adapter set, never a mixture."""

    def __init__(self, bundle_dir: Path, manifest: Manifest, store: WeightStore, backend: str,
                 device: str, mode: str, mode_reason: str, verify_base: bool = True) -> None:
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        self.store = store
        self.backend = backend
        self.device = device
        self.mode = mode
        self.mode_reason = mode_reason
        self.engine = SwitchEngine(store, verify_base=verify_base)
        self._prepared: dict[str, PreparedAdapter] = {}
        self._cache_lock = threading.Lock()

    # -- queries ---------------------------------------------------------------------------

    @property
    def adapters(self) -> list[str]:
        """Names of the adapters registered in the bundle."""
        return sorted(self.manifest.adapters)

    @property
    def active(self) -> tuple[str, ...]:
        """Names of the adapters applied now, in switch order; () for the base model."""
        return tuple(name for name, _ in self.engine.active)

    @property
    def active_scales(self) -> tuple[tuple[str, float], ...]:
        return self.engine.active

    def restore_memory_bytes(self) -> int:
        """Extra memory held now to restore the base exactly (see docs/runtime.md)."""
        return self.engine.restore_memory_bytes()

    # -- verbs -----------------------------------------------------------------------------

    def prepare(self, name: str) -> PreparedAdapter:
        """Read, validate and map adapter ``name`` (cached; switching prepares on demand)."""
        with self._cache_lock:
            prep = self._prepared.get(name)
        if prep is not None:
            return prep
        entry = self.manifest.adapters.get(name)
        if entry is None:
            raise UnknownNameError(f"no adapter named {name!r} in {self.bundle_dir}; the "
                                   f"bundle has: {', '.join(self.adapters) or '(none)'}")
        if entry.variant is not None or entry.method == "sira":
            raise SwitchError(f"adapter {name!r} ({entry.method}) runs unfused in graph variant "
                              f"{entry.variant!r}; fused switching cannot apply it")
        adapter = read_adapter(self.bundle_dir / entry.file, self.manifest)
        prep = self.engine.prepare(adapter, name)
        with self._cache_lock:
            self._prepared[name] = prep
        return prep

    def switch(self, names: str | Sequence[str] | None,
               scales: float | Sequence[float] | None = None) -> None:
        """Make ``names`` the active adapters (fused, added together), or the base for None.

        scales: one per name (or one number for a single name); default each adapter's own
        scale. ``W = W0 + sum_k scales[k] * delta_k`` for every touched weight.
        Raises UnknownNameError, AdapterFormatError / FingerprintMismatchError,
        TargetMismatchError, SwitchError; on any error the weights are untouched.
        """
        if names is None:
            names = []
        elif isinstance(names, str):
            names = [names]
        names = list(names)
        if len(set(names)) != len(names):
            raise ConfigError(f"switch: adapter names repeat: {names}; use scales instead")
        if scales is None:
            scale_list: list[float | None] = [None] * len(names)
        elif isinstance(scales, (int, float)):
            if len(names) != 1:
                raise ConfigError("switch: give one scale per adapter name")
            scale_list = [float(scales)]
        else:
            scale_list = [float(s) for s in scales]
            if len(scale_list) != len(names):
                raise ConfigError(f"switch: {len(names)} names but {len(scale_list)} scales")
        for s in scale_list:
            if s is not None and not math.isfinite(s):
                raise ConfigError(f"switch: scale {s} is not finite")
        preps = [self.prepare(n) for n in names]
        self.engine.switch([(p, p.scale if s is None else s) for p, s in
                            zip(preps, scale_list, strict=True)])

    def run(self, **inputs: np.ndarray) -> np.ndarray:
        """One forward pass with the active adapters; numpy arrays in, logits out."""
        return self.engine.run(inputs)


def load(bundle_dir: str | Path, backend: str = "onnxruntime", device: str = "cpu",
         mode: str = "auto", threads: int | None = None, runs_per_switch: float | None = None,
         batch: int | None = None, verify_base: bool = True) -> Runtime:
    """Load a bundle for in-place adapter switching.

    backend: "onnxruntime" (no torch needed) or "executorch".
    device: "cpu" or "cuda" (ONNX Runtime with the CUDA execution provider; live mode).
    mode: "live" (live weights edited where the kernels read them; unpacked), "repack" (edit a
        host copy, rebuild so every weight is packed; a rebuild per switch) or "auto"
        (:func:`choose_mode` from ``runs_per_switch`` and ``batch``; ``rt.mode_reason`` says why).
    threads: intra-op threads (None: the backend's default).
    verify_base: hash the live weights against bundle.json's sha256 at load.
    """
    bundle = Path(bundle_dir)
    manifest = read_manifest(bundle)
    if mode not in MODES:
        raise ConfigError(f"mode {mode!r}: choose one of {', '.join(MODES)}")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r}: choose 'cpu' or 'cuda'")
    if mode == "auto":
        chosen, reason = ("live", "auto: CUDA kernels read raw weights") if device == "cuda" \
            else choose_mode(runs_per_switch, batch)
    else:
        chosen, reason = mode, "requested"
    store = _open_store(backend, bundle, manifest, device, chosen, threads)
    return Runtime(bundle, manifest, store, backend, device, chosen, reason, verify_base)
