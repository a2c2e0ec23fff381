"""Unfused adapters: LoRA / SoRA / SiRA branches driven as inputs of a graph *variant*.

An adapter whose bundle entry names a ``variant`` (always SiRA; LoRA / SoRA exported with
``unfused=True``) runs through that variant's graph: the base model with a branch on every
live weight, whose parameters are extra graph inputs (``manifest.variants[key]["onnx"]
["branch_inputs"]``: torch weight name -> {"A", "B"} or {"router", "A", "B"} -> input name).
The base weights are never edited:

- LoRA / pruned SoRA (``LoraDelta``; A (r, in), B (out, r), alpha / r folded in):
  ``y = W0 x + (s B) (A x)`` — the scale ``s`` is folded into B. The variant's rank dimension
  is dynamic but *one* symbol shared by every branch, so all branches are zero-padded to the
  adapter's largest rank R (A (R, in), B (out, R); the padding adds exact zeros) — pruned SoRA
  with per-matrix ranks and weights the adapter leaves alone (all zero) both run.
- SiRA (``SiraBranch``; router (E, in), A (E, r, in), B (E, out, r)):
  ``y = W0 x + s * sum_{e in topk(x)} p_e(x) B_e A_e x``, ``s`` folded into B; E, r, top_k and
  capacity_factor must equal the variant's (they are baked into its graph); untouched live
  weights get all-zero branches (zero B: no contribution).

:func:`prepare_branches` validates and maps an adapter once (torch-free, numpy);
:class:`OrtVariantSession` is the variant's ONNX Runtime session whose live-weight inputs are
bound to the *same* runtime-owned buffers as the fused path (aliasing OrtValues), so the two
paths never disagree; the branch tensors are overridable initializers, bound with
``bind_ortvalue_input`` on one IOBinding per calling thread and rebound after a switch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from edgeadapt.errors import (
    AdapterFormatError,
    BundleError,
    FingerprintMismatchError,
    SwitchError,
    TargetMismatchError,
)
from edgeadapt.format.layout import BLOCKED
from edgeadapt.format.manifest import Manifest
from edgeadapt.format.types import Adapter, LoraDelta, SiraBranch
from edgeadapt.runtime.store import LiveWeight

#: variant branch kind -> the adapter methods it runs
KIND_METHODS = {"lora": ("lora", "sora"), "sira": ("sira",)}


@dataclass(frozen=True)
class PreparedBranches:
    """An unfused adapter mapped onto a variant: graph input name -> float32 tensor, scale
    still to be folded in (:meth:`feeds`), plus the adapter's task head (torch layout)."""

    name: str
    method: str
    variant: str
    scale: float
    tensors: dict[str, np.ndarray]
    scaled_keys: frozenset[str]  # input names whose tensor the scale multiplies (the B's)
    head: dict[str, np.ndarray]

    def feeds(self, scale: float | None = None) -> dict[str, np.ndarray]:
        """Graph input name -> tensor with ``scale`` (default: the adapter's) folded into B.
        SwitchError if ``scale * B`` overflows float32 (nothing is bound then)."""
        s = self.scale if scale is None else float(scale)
        out = {}
        with np.errstate(over="ignore", invalid="ignore"):  # checked right below
            for k, v in self.tensors.items():
                if k in self.scaled_keys:
                    v = np.ascontiguousarray(v * np.float32(s))
                    if not np.isfinite(v).all():
                        raise SwitchError(f"adapter {self.name!r}: scale {s:g} makes branch "
                                          f"tensor {k!r} overflow float32; use a smaller scale")
                out[k] = v
        return out

    def nbytes(self) -> int:
        return sum(v.nbytes for v in self.tensors.values())


def variant_spec(manifest: Manifest, key: str, backend: str = "onnx") -> dict:
    """The variant's backend section (``"onnx"`` or ``"executorch"``); BundleError if absent."""
    v = manifest.variants.get(key)
    if v is None:
        raise BundleError(f"graph variant {key!r} is not in the bundle")
    section = v.get(backend)
    if not section or "file" not in section:
        raise BundleError(f"graph variant {key!r} has no {backend} graph; re-export the adapter "
                          f"with --formats including {backend}")
    return section


def _f32(arr: np.ndarray, shape: tuple[int, ...], where: str) -> np.ndarray:
    a = np.asarray(arr)
    if a.shape != shape:
        raise AdapterFormatError(f"{where}: shape {a.shape}, the variant expects {shape}")
    a = np.ascontiguousarray(a, dtype=np.float32)
    if not np.isfinite(a).all():
        raise AdapterFormatError(f"{where}: non-finite values")
    return a


def prepare_branches(adapter: Adapter, name: str, manifest: Manifest, key: str,
                     backend: str = "onnx") -> PreparedBranches:
    """Validate ``adapter`` against variant ``key`` and map it to the variant's branch inputs.

    Every branch input of the variant gets a tensor: the adapter's (B tensors marked for the
    scale) or a zero branch. Raises TargetMismatchError (weight without a branch),
    FingerprintMismatchError (other base), AdapterFormatError (shapes, non-finite values),
    SwitchError (the adapter's method or SiRA shape does not fit the variant).
    """
    section = variant_spec(manifest, key, backend)
    branch = manifest.variants[key].get("branch", {})
    kind = branch.get("kind")
    # ONNX: {"A": input, ...}; ExecuTorch: {"lora_A": buffer, ...} -> {"A": buffer, ...}
    names = {w: {k.split("_", 1)[1] if k.startswith(("lora_", "sira_")) else k: v
                 for k, v in d.items()}
             for w, d in (section.get("branch_inputs") or section.get("branch_buffers")
                          or {}).items()}
    if kind not in KIND_METHODS or not names:
        raise BundleError(f"graph variant {key!r}: unknown branch kind {kind!r} or no branch "
                          "inputs recorded")
    if adapter.method not in KIND_METHODS[kind]:
        raise SwitchError(f"adapter {name!r} ({adapter.method}) cannot run in graph variant "
                          f"{key!r} ({kind} branches)")
    if not np.isfinite(adapter.scale):
        raise AdapterFormatError(f"adapter {name!r}: scale {adapter.scale} is not finite")
    missing = sorted(set(adapter.targets) - set(names))
    if missing:
        raise TargetMismatchError(f"adapter {name!r} touches weights without a branch in "
                                  f"variant {key!r}: {missing}")
    spec = branch.get("spec") or []
    rmax = max((d.rank for d in adapter.targets.values() if isinstance(d, LoraDelta)),
               default=0)
    if kind == "lora" and backend != "onnx":  # fixed-size branch buffers: pad to the variant's
        if rmax > int(spec[1]):
            raise SwitchError(f"adapter {name!r}: LoRA rank {rmax} exceeds the rank "
                              f"{spec[1]} of variant {key!r}'s {backend} buffers")
        rmax = int(spec[1])
    tensors: dict[str, np.ndarray] = {}
    scaled: set[str] = set()
    for wname, inputs in names.items():
        entry = manifest.weights.get(wname)
        if entry is None:
            raise BundleError(f"variant {key!r}: branch on {wname!r}, not a bundle weight")
        out, inp = entry.shape
        delta = adapter.targets.get(wname)
        where = f"adapter {name!r}, weight {wname!r}"
        if delta is not None:
            shape = tuple(int(s) for s in adapter.shapes.get(wname, ()))
            if shape != (out, inp) or adapter.weight_sha256.get(wname) != entry.sha256:
                raise FingerprintMismatchError(f"{where}: trained on another base weight "
                                               f"(shape {shape}, sha256 mismatch or absent)")
        if kind == "lora":
            if delta is not None and not isinstance(delta, LoraDelta):
                raise SwitchError(f"{where}: a {type(delta).__name__} in a LoRA variant")
            a = np.zeros((rmax, inp), np.float32)
            b = np.zeros((out, rmax), np.float32)
            if delta is not None:
                r = delta.rank
                a[:r] = _f32(delta.A, (r, inp), f"{where} A")
                b[:, :r] = _f32(delta.B, (out, r), f"{where} B")
            tensors[inputs["A"]], tensors[inputs["B"]] = a, b
        else:
            _, e, r, k, cf = spec
            if delta is not None:
                if not isinstance(delta, SiraBranch):
                    raise SwitchError(f"{where}: a {type(delta).__name__} in a SiRA variant")
                if (delta.num_experts, int(delta.A.shape[1]), delta.top_k) != (e, r, k) or \
                        abs(float(delta.capacity_factor) - float(cf)) > 1e-9:
                    raise SwitchError(
                        f"{where}: SiRA (E={delta.num_experts}, r={delta.A.shape[1]}, top_k="
                        f"{delta.top_k}, cf={delta.capacity_factor}) does not fit variant {key!r}")
            z = delta is None
            tensors[inputs["router"]] = _f32(np.zeros((e, inp)) if z else delta.router,
                                             (e, inp), f"{where} router")
            tensors[inputs["A"]] = _f32(np.zeros((e, r, inp)) if z else delta.A, (e, r, inp),
                                        f"{where} A")
            tensors[inputs["B"]] = _f32(np.zeros((e, out, r)) if z else delta.B, (e, out, r),
                                        f"{where} B")
        scaled.add(inputs["B"])
    return PreparedBranches(name, adapter.method, key, float(adapter.scale), tensors,
                            frozenset(scaled), dict(adapter.head))


class OrtVariantSession:
    """A CPU session of a branch variant graph sharing the runtime's live-weight buffers.

    live: the fused store's live weights (their arrays are bound by aliasing OrtValues, never
    copied, so this session reads exactly what the base session reads). kernel: read the
    blocked32 ones with edgeadapt's own kernel, as the base session does
    (:func:`edgeadapt.runtime.onnxruntime_backend.cpu_session`). ``set_branches`` is
    called with runs excluded (the runtime's exclusive lock); each thread's IOBinding rebinds
    the branch tensors when it sees a new generation.
    """

    def __init__(self, bundle_dir: Path, manifest: Manifest, key: str,
                 live: dict[str, LiveWeight], threads: int | None = None,
                 prepare_inputs: Callable[[dict], dict] | None = None, kernel: bool = False
                 ) -> None:
        from edgeadapt.runtime.onnxruntime_backend import _require_ort, cpu_session, session_options

        ort = _require_ort()
        section = variant_spec(manifest, key, "onnx")
        root = bundle_dir / manifest.variants[key].get("dir", "")
        path = root / section["file"] if (root / section["file"]).is_file() \
            else bundle_dir / section["file"]
        if not path.is_file():
            raise BundleError(f"{path}: the graph of variant {key!r} is missing")
        so = session_options(threads)
        so.log_severity_level = 3  # overridable branch initializers make ORT warn per input
        self.key = key
        vweights = manifest.variants[key].get("weights", {})
        entries = {w: (vweights.get(w) or {}).get("onnx") or manifest.weights[w].onnx or {}
                   for w in live}  # the variant's own entry, else the base graph's
        for wname, lw in live.items():
            if entries[wname].get("layout", lw.layout) != lw.layout:
                raise BundleError(f"variant {key!r}: {wname!r} has layout "
                                  f"{entries[wname].get('layout')}, the live buffer "
                                  f"{lw.layout}; cannot share it")
        self.session, self.kernel = cpu_session(
            path, so, [entries[w]["name"] for w, lw in live.items() if lw.layout == BLOCKED],
            kernel)
        self.output_name = self.session.get_outputs()[0].name
        graph_inputs = {i.name for i in self.session.get_inputs()}
        # overridable initializers (the branch tensors): name -> dims (int, or str if symbolic)
        self._branch_specs = {i.name: list(i.shape)
                              for i in self.session.get_overridable_initializers()
                              if i.type == "tensor(float)"}
        self._values = {}
        for wname, lw in live.items():
            onnx = entries[wname]
            if onnx["name"] not in graph_inputs:
                raise BundleError(f"{path}: live weight {onnx['name']!r} is not a graph input")
            self._values[onnx["name"]] = ort.OrtValue.ortvalue_from_numpy(lw.array)
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
        from edgeadapt.runtime.onnxruntime_backend import run_bound

        return run_bound(self.session, self._binding(), self._prepare_inputs(inputs),
                         self.output_name)


class VariantRoute(Protocol):
    """What ``Runtime.run`` routes through while an unfused adapter is active."""

    key: str

    def check_branches(self, feeds: dict[str, np.ndarray],
                       head: dict[str, np.ndarray] | None = None) -> None: ...

    def set_branches(self, feeds: dict[str, np.ndarray],
                     head: dict[str, np.ndarray] | None = None) -> None: ...

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray: ...
