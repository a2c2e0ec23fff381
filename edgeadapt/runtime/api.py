"""``edgeadapt.runtime.load(bundle)`` -> :class:`Runtime`: switch adapters in place, run.

    rt = load("bundle/", backend="onnxruntime", device="cpu", mode="auto")
    rt.switch("sentiment")                              # fused, in place
    rt.switch(["sentiment", "politics"], scales=[1.0, 0.5])
    rt.switch(None)                                     # the base, bit for bit
    rt.switch("sira_adapter")      # an adapter with a graph variant: unfused, branches as inputs
    logits = rt.run(input_ids=ids, attention_mask=mask)

The ONNX Runtime path imports no torch. Errors are typed (edgeadapt.errors) and a refused
switch leaves the weights exactly as they were.
"""

from __future__ import annotations

import importlib
import math
import numbers
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgeadapt.errors import AdapterFormatError, ConfigError, SwitchError, UnknownNameError
from edgeadapt.format.adapter_file import read_adapter
from edgeadapt.format.manifest import AdapterEntry, Manifest, manifest_path, read_manifest
from edgeadapt.format.types import Adapter
from edgeadapt.runtime.engine import SwitchEngine
from edgeadapt.runtime.inputs import check_inputs
from edgeadapt.runtime.locks import ReadWriteLock
from edgeadapt.runtime.prepared import PreparedAdapter
from edgeadapt.runtime.store import WeightStore
from edgeadapt.runtime.unfused import (
    OrtVariantSession,
    PreparedBranches,
    VariantRoute,
    prepare_branches,
)

BACKENDS = ("onnxruntime", "executorch")
MODES = ("live", "repack", "auto")
#: Runs per switch from which ``auto`` picks repack, per (backend, live form) and batch class
#: (batch 1 / batch >= 8; batches in between use the batch-1 row): twice the live-vs-repack
#: break-even (1x1, 8x64) measured on SmolLM2 with q/v live (docs/bench.md), the factor 2 for the
#: runs' spread. ONNX Runtime ``own-kernel`` (edgeadapt's kernel reading blocked32): run 9 and
#: its repeat, never, never / 36, 75 (the smaller); ``blocked32``: run 5, never / 34;
#: ``transposed``: run 4, 340 / 55. ExecuTorch ``own-kernel``: run 5 and two repeats, never,
#: 21422, 10690 / 685, 114, 81 (live within the noise of packed: the smallest of each);
#: ``weight-left``: run 3, 345 and 351 / never; ``linear``: run 2, 291 / 45.
REPACK_RUNS_PER_SWITCH = {("onnxruntime", "own-kernel"): {1: math.inf, 8: 72.0},
                          ("onnxruntime", "blocked32"): {1: math.inf, 8: 68.0},
                          ("onnxruntime", "transposed"): {1: 680.0, 8: 110.0},
                          ("executorch", "own-kernel"): {1: 21380.0, 8: 162.0},
                          ("executorch", "weight-left"): {1: 690.0, 8: math.inf},
                          ("executorch", "linear"): {1: 582.0, 8: 90.0}}
#: the form a backend's exporter writes today (what ``choose_mode`` assumes without a bundle)
DEFAULT_LIVE_FORM = {"onnxruntime": "blocked32", "executorch": "own-kernel"}
REPACK_BATCH = 8


def live_form(manifest: Manifest, backend: str) -> str:
    """How the bundle's base graph reads its live weights on ``backend``, the key of
    :data:`REPACK_RUNS_PER_SWITCH`: ONNX ``blocked32`` when any live weight has that layout, else
    ``transposed``; ExecuTorch the section's ``live_form`` (absent in bundles exported before
    the weight-left form: ``linear``)."""
    if backend == "executorch":
        return str((manifest.executorch or {}).get("live_form") or "linear")
    layouts = {(w.onnx or {}).get("layout") for w in manifest.weights.values()}
    return "blocked32" if "blocked32" in layouts else "transposed"


def choose_mode(runs_per_switch: float | None, batch: int | None,
                backend: str = "onnxruntime", form: str | None = None) -> tuple[str, str]:
    """The ``auto`` policy: (mode, reason).

    Repack when ``runs_per_switch >= REPACK_RUNS_PER_SWITCH[(backend, form)][1 or 8]``: a rebuild
    per switch (0.5-1.7 s on SmolLM2) against what the live weights cost each forward in that
    form (ONNX Runtime own-kernel: 0.98x at one token, 1.003-1.006x at 8x64; blocked32: 0.98x /
    1.006x; transposed: 1.07x / 1.00x;
    ExecuTorch own-kernel: 0.98-0.99x / 1.00-1.01x; weight-left: 1.06-1.08x / <= 1.0x; linear:
    1.11x / 1.005x).
    ``form`` None: the backend's :data:`DEFAULT_LIVE_FORM`. Without a workload: live.
    """
    if runs_per_switch is None or batch is None:
        return "live", "auto: no workload given (runs_per_switch, batch); live is never stale " \
                       "and switches in milliseconds"
    form = form or DEFAULT_LIVE_FORM.get(backend, "blocked32")
    row = REPACK_RUNS_PER_SWITCH.get((backend, form))
    if row is None:
        raise ConfigError(f"no auto policy for backend {backend!r} with live form {form!r}: "
                          f"known {sorted(REPACK_RUNS_PER_SWITCH)}; pass mode='live' or 'repack'")
    threshold = row[REPACK_BATCH] if batch >= REPACK_BATCH else row[1]
    where = f"{backend} ({form} live weights)"
    if runs_per_switch >= threshold:
        return "repack", (f"auto: {runs_per_switch:g} runs per switch at batch {batch} >= "
                          f"{threshold:g} on {where} (2x the measured break-even): packed "
                          "weights repay the rebuild")
    return "live", (f"auto: {runs_per_switch:g} runs per switch at batch {batch} < "
                    f"{threshold:g} on {where}: a rebuild per switch would cost more than "
                    "the live weights")


def _open_store(backend: str, bundle_dir: Path, manifest: Manifest, device: str, mode: str,
                threads: int | None, kernel: bool) -> WeightStore:
    module = importlib.import_module(f"edgeadapt.runtime.{backend}_backend")
    if backend == "executorch":
        if device != "cpu":
            raise ConfigError("backend 'executorch' runs on device='cpu' only")
        return module.open_store(bundle_dir, manifest.to_dict(), mode=mode, threads=threads)
    return module.open_store(bundle_dir, manifest, device=device, mode=mode, threads=threads,
                             kernel=kernel)


def _ort_kernel(manifest: Manifest, backend: str, device: str, kernel: bool | None) -> bool:
    """Whether ONNX Runtime's CPU live session reads the blocked32 live weights with
    edgeadapt's own kernel (:func:`edgeadapt.runtime.onnxruntime_backend.use_kernel`)."""
    if backend != "onnxruntime" or device != "cpu":
        if kernel:
            raise ConfigError("kernel=True: edgeadapt's ONNX Runtime kernel runs on "
                              "backend='onnxruntime', device='cpu' only")
        return False
    from edgeadapt.runtime.onnxruntime_backend import use_kernel

    return use_kernel(kernel, ((w.onnx or {}).get("layout") for w in manifest.weights.values()))


class Runtime:
    """A loaded bundle whose live weights are switched in place. Thread-safe: ``run`` may be
    called from many threads while another thread switches; a run sees the old or the new
    adapter set, never a mixture.

    Adapters whose bundle entry names a graph ``variant`` (SiRA; LoRA / SoRA exported with
    ``unfused=True``) run *unfused*: the switch returns fused weights to the base, binds the
    adapter's branch tensors to the variant's session (created once, on first use, sharing the
    live-weight buffers) and routes ``run`` through it until the next switch.
    """

    def __init__(self, bundle_dir: Path, manifest: Manifest, store: WeightStore, backend: str,
                 device: str, mode: str, mode_reason: str, verify_base: bool = True,
                 threads: int | None = None) -> None:
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        self.store = store
        self.backend = backend
        self.device = device
        self.fused_mode = mode
        self.mode_reason = mode_reason
        self.threads = threads
        #: how the live weights are read in live mode (a key of REPACK_RUNS_PER_SWITCH)
        self.live_form = "own-kernel" if getattr(store, "kernel", False) \
            else live_form(manifest, backend)
        self.engine = SwitchEngine(store, verify_base=verify_base)
        self._prepared: dict[str, PreparedAdapter] = {}
        self._branches: dict[str, PreparedBranches] = {}
        self._variants: dict[str, VariantRoute] = {}
        self._cache_lock = threading.Lock()
        self._switch_lock = threading.Lock()  # one switch at a time
        # Taken shared by run, exclusive when the route (base graph <-> variant) changes;
        # always acquired before the engine's lock.
        self._route_lock = ReadWriteLock()
        self._route: VariantRoute | None = None
        self._route_active: tuple[tuple[str, float], ...] = ()

    # -- queries ---------------------------------------------------------------------------

    @property
    def adapters(self) -> list[str]:
        """Names of the adapters registered in the bundle."""
        return sorted(self.manifest.adapters)

    @property
    def active(self) -> tuple[str, ...]:
        """Names of the adapters applied now, in switch order; () for the base model."""
        return tuple(name for name, _ in self.active_scales)

    @property
    def active_scales(self) -> tuple[tuple[str, float], ...]:
        return self._route_active if self._route is not None else self.engine.active

    @property
    def active_variant(self) -> str | None:
        """Key of the graph variant runs go through (an unfused adapter is active), or None."""
        route = self._route
        return None if route is None else route.key

    @property
    def mode(self) -> str:
        """``"unfused"`` while an unfused adapter is active, else the fused mode in use
        (``"live"`` or ``"repack"``, see ``mode_reason``)."""
        return "unfused" if self._route is not None else self.fused_mode

    def is_unfused(self, name: str) -> bool:
        """Whether adapter ``name`` runs unfused (its bundle entry names a graph variant)."""
        entry = self._entry(name)
        return entry.variant is not None or entry.method == "sira"

    def restore_memory_bytes(self) -> int:
        """Extra memory held now to restore the base exactly (see docs/runtime.md)."""
        return self.engine.restore_memory_bytes()

    def plan_cache_bytes(self) -> int:
        """Memory held by cached switch plans (docs/runtime.md, "Switch plan cache")."""
        return self.engine.plan_cache_bytes()

    # -- verbs -----------------------------------------------------------------------------

    def prepare(self, name: str) -> PreparedAdapter:
        """Read, validate and map adapter ``name`` (cached; switching prepares on demand)."""
        with self._cache_lock:
            prep = self._prepared.get(name)
        if prep is not None:
            return prep
        entry = self._entry(name)
        if entry.variant is not None or entry.method == "sira":
            raise SwitchError(f"adapter {name!r} ({entry.method}) runs unfused in graph variant "
                              f"{entry.variant!r}; fused switching cannot apply it (switch to it "
                              "alone: rt.switch(name))")
        prep = self.engine.prepare(self._read(name, entry), name)
        with self._cache_lock:
            self._prepared[name] = prep
        return prep

    def _entry(self, name: str) -> AdapterEntry:
        entry = self.manifest.adapters.get(name) if isinstance(name, str) else None
        if entry is None:
            raise UnknownNameError(f"no adapter named {name!r} in {self.bundle_dir}; the "
                                   f"bundle has: {', '.join(self.adapters) or '(none)'}")
        return entry

    def _read(self, name: str, entry: AdapterEntry) -> Adapter:
        """Adapter ``name``'s file, validated against the bundle (``read_adapter``) and against
        its entry: AdapterFormatError if the file holds another method than bundle.json says."""
        adapter = read_adapter(self.bundle_dir / entry.file, self.manifest)
        if adapter.method != entry.method:
            raise AdapterFormatError(f"{self.bundle_dir / entry.file}: a {adapter.method} "
                                     f"adapter, but bundle.json registers {name!r} as "
                                     f"{entry.method}; re-register it (edgeadapt export adapter)")
        return adapter

    def prepare_unfused(self, name: str) -> PreparedBranches:
        """Read and validate unfused adapter ``name`` against its graph variant (cached)."""
        with self._cache_lock:
            pb = self._branches.get(name)
        if pb is not None:
            return pb
        entry = self._entry(name)
        if entry.variant is None:
            raise SwitchError(f"adapter {name!r} ({entry.method}) has no graph variant in the "
                              "bundle; export it with unfused=True (SiRA always has one)")
        pb = prepare_branches(self._read(name, entry), name, self.manifest, entry.variant,
                              "executorch" if self.backend == "executorch" else "onnx")
        if pb.head:  # validated now, applied by the engine at switch time
            self.engine.prepare(_head_only_from(pb), name)
        with self._cache_lock:
            self._branches[name] = pb
        return pb

    def _variant_session(self, key: str) -> VariantRoute:
        sess = self._variants.get(key)  # only switches (serialised) create sessions
        if sess is not None:
            return sess
        if self.device != "cpu":
            raise SwitchError(f"unfused adapters (graph variant {key!r}) run on device='cpu' "
                              "only so far")
        if self.backend == "executorch":
            from edgeadapt.runtime.executorch_unfused import EtVariantProgram

            sess = EtVariantProgram(self.bundle_dir, self.manifest, key)
        else:
            sess = OrtVariantSession(self.bundle_dir, self.manifest, key,
                                     self.store.live_weights(), self.threads,
                                     getattr(self.store, "_feeds", None),
                                     kernel=getattr(self.store, "kernel", False))
        self._variants[key] = sess
        return sess

    def _switch_unfused(self, name: str, scale: float | None) -> None:
        pb = self.prepare_unfused(name)
        sess = self._variant_session(pb.variant)
        s = pb.scale if scale is None else float(scale)
        feeds = pb.feeds(s)
        sess.check_branches(feeds, pb.head)  # before the engine leaves the fused adapters
        head = [(self.engine.prepare(_head_only_from(pb), name), 1.0)] if pb.head else []
        with self._route_lock.exclusive():
            self.engine.switch(head)  # fused edits back to base (the task head, if any, on)
            sess.set_branches(feeds, pb.head)
            self._route = sess
            self._route_active = ((name, s),)

    def switch(self, names: str | Sequence[str] | None,
               scales: float | Sequence[float] | None = None) -> None:
        """Make ``names`` the active adapters (fused, added together), or the base for None.

        scales: one per name (or one number for a single name); default each adapter's own
        scale. ``W = W0 + sum_k scales[k] * delta_k`` for every touched weight.
        Raises UnknownNameError, AdapterFormatError / FingerprintMismatchError,
        TargetMismatchError, SwitchError; on any error the weights are untouched.
        """
        names = _name_list(names)
        scale_list = _scale_list(scales, len(names))
        unfused = [n for n in names if self.is_unfused(n)]
        if unfused and len(names) != 1:
            raise ConfigError(f"switch: adapter(s) {unfused} run unfused (graph variant) and can "
                              f"only be active alone; got {names}")
        with self._switch_lock:
            if unfused:
                self._switch_unfused(names[0], scale_list[0])
                return
            preps = [self.prepare(n) for n in names]
            pairs = [(p, p.scale if s is None else s) for p, s in
                     zip(preps, scale_list, strict=True)]
            if self._route is None:
                self.engine.switch(pairs)  # plans while runs go on
                return
            with self._route_lock.exclusive():  # leave the variant and fuse atomically
                self.engine.switch(pairs)
                self._route = None
                self._route_active = ()

    def run(self, **inputs: np.ndarray) -> np.ndarray:
        """One forward pass with the active adapters; numpy arrays in, logits out. The inputs
        are checked against the bundle's (:func:`edgeadapt.runtime.inputs.check_inputs`:
        names, dtypes, shapes, token id range) first; ConfigError if they do not fit."""
        inputs = check_inputs(self.manifest.inputs, inputs)
        with self._route_lock.shared():
            route = self._route
            if route is None:
                return self.engine.run(inputs)
            return route.run(inputs)


def _name_list(names: object) -> list[str]:
    """``switch``'s names as a list: None -> [], one str -> [it]; ConfigError for anything but
    str names, or a name given twice."""
    if names is None:
        return []
    if isinstance(names, str):
        return [names]
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"switch: names must be None, an adapter name or a list of names; "
                          f"got {names!r}")
    if len(set(names)) != len(names):
        raise ConfigError(f"switch: adapter names repeat: {list(names)}; use scales instead")
    return list(names)


def _scale(value: object) -> float:
    """One scale as a finite float: a Python or numpy real number or a 0-d array (no bools,
    no strings); ConfigError otherwise."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ConfigError(f"switch: scale {value!r} is not a real number")
    s = float(value)
    if not math.isfinite(s):
        raise ConfigError(f"switch: scale {s} is not finite")
    return s


def _scale_list(scales: object, n: int) -> list[float | None]:
    """``switch``'s scales, one per name (None: each adapter's own); ConfigError on a count
    mismatch or a value :func:`_scale` refuses."""
    if scales is None:
        return [None] * n
    if isinstance(scales, (list, tuple)) or (isinstance(scales, np.ndarray) and scales.ndim == 1):
        out: list[float | None] = [_scale(s) for s in scales]
        if len(out) != n:
            raise ConfigError(f"switch: {n} names but {len(out)} scales")
        return out
    if n != 1:
        raise ConfigError("switch: give one scale per adapter name")
    return [_scale(scales)]


def _head_only_from(pb: PreparedBranches) -> Adapter:
    """The part of an unfused adapter the engine applies: its task head (no deltas)."""
    return Adapter(pb.method, {}, {}, {}, head=pb.head)


def _without_kernel(manifest: Manifest, reason: str) -> tuple[str, str]:
    """``auto`` on an ExecuTorch bundle whose live program calls edgeadapt's own kernel
    (live form ``own-kernel``): where the kernel cannot be built or loaded (no C++ compiler),
    repack instead, whose constant program does not call it. (mode, reason)."""
    section = manifest.executorch or {}
    if section.get("live_form") != "own-kernel" or not section.get("repack"):
        return "live", reason  # without a constant program the store's error says what to do
    from edgeadapt.runtime.executorch_kernel import unavailable

    problem = unavailable()
    if problem is None:
        return "live", reason
    return "repack", (f"auto: the live program needs edgeadapt's own kernel, which cannot be "
                      f"loaded here ({problem}); the constant program runs without it")


def load(bundle_dir: str | Path, backend: str = "onnxruntime", device: str = "cpu",
         mode: str = "auto", threads: int | None = None, runs_per_switch: float | None = None,
         batch: int | None = None, verify_base: bool = True, kernel: bool | None = None
         ) -> Runtime:
    """Load a bundle for in-place adapter switching.

    backend: "onnxruntime" (no torch needed) or "executorch".
    device: "cpu" or "cuda" (ONNX Runtime with the CUDA execution provider; live mode).
    mode: "live" (live weights edited where the kernels read them; unpacked), "repack" (edit a
        host copy, rebuild so every weight is packed; a rebuild per switch) or "auto"
        (:func:`choose_mode` from ``runs_per_switch`` and ``batch``; repack where an ExecuTorch
        own-kernel program's kernel cannot be built; ``rt.mode_reason`` says why).
    threads: intra-op threads (None: the backend's default). ExecuTorch has one threadpool
        per process: it is resized only while no other ExecuTorch runtime is loaded
        (:func:`edgeadapt.runtime.executorch_backend.use_threads`).
    verify_base: hash the live weights against bundle.json's sha256 at load.
    kernel: ONNX Runtime on the CPU, live mode: read the blocked32 live weights with
        edgeadapt's own kernel (``edgeadapt.BlockedMatMul``, no per-call copy of the weight)
        instead of MatMul. None: where it can be built here (C++ compiler and ONNX Runtime's
        headers, :mod:`edgeadapt.runtime.onnxruntime_kernel`); True: ConfigError if it cannot
        be; False: never. ``rt.live_form`` says which form live mode reads.
    """
    manifest = read_manifest(bundle_dir)
    bundle = manifest_path(bundle_dir).parent  # bundle/ or bundle/bundle.json
    if mode not in MODES:
        raise ConfigError(f"mode {mode!r}: choose one of {', '.join(MODES)}")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r}: choose 'cpu' or 'cuda'")
    if backend not in BACKENDS:
        raise UnknownNameError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 1:
            raise ConfigError(f"threads={threads!r}: a whole number >= 1, or None for the "
                              "backend's default")
        threads = int(threads)
    # repack sessions never read through the kernel: build it only where live mode may run
    use_kernel = _ort_kernel(manifest, backend, device, kernel) \
        if mode != "repack" or kernel else False
    form = "own-kernel" if use_kernel else live_form(manifest, backend)
    if mode == "auto":
        chosen, reason = ("live", "auto: CUDA kernels read raw weights") if device == "cuda" \
            else choose_mode(runs_per_switch, batch, backend, form)
        if chosen == "live" and backend == "executorch":
            chosen, reason = _without_kernel(manifest, reason)
    else:
        chosen, reason = mode, "requested"
    store = _open_store(backend, bundle, manifest, device, chosen, threads, use_kernel)
    return Runtime(bundle, manifest, store, backend, device, chosen, reason, verify_base,
                   threads)


def load_cuda_standin(bundle_dir: str | Path, torch_buffers: bool = True,
                      threads: int | None = 1) -> Runtime:
    """A Runtime on the CUDA store's code with the CPU execution provider standing in for the
    GPU (``OrtDeviceStore(device="cpu")``): its "device" buffers are separate host copies bound by
    pointer (torch tensors if ``torch_buffers``, else OrtValues refreshed with
    ``update_inplace``), so the outputs follow a switch only if ``commit`` moved it into them.
    For tests and scripts/cuda_check.py on machines without a GPU; not a deployment mode."""
    from edgeadapt.runtime.onnxruntime_backend import open_cuda_standin

    bundle = Path(bundle_dir)
    manifest = read_manifest(bundle)
    store = open_cuda_standin(bundle, manifest, use_torch=torch_buffers, threads=threads)
    return Runtime(bundle, manifest, store, "onnxruntime", "cpu", "live",
                   "CUDA store on the CPU execution provider (stand-in)")
