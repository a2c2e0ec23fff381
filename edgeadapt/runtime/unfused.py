"""Unfused adapters: LoRA / SoRA / SiRA branches driven as inputs of a graph *variant*
(backend-neutral numpy; each backend runs the variant: ``runtime/backends/<name>/variant.py``).

An adapter whose bundle entry names a ``variant`` (always SiRA; LoRA / SoRA exported with
``unfused=True``) runs through that variant's graph: the base model with a branch on every
live weight, whose parameters are extra graph inputs (``manifest.variants[key][section]
["branch_inputs"]``: torch weight name -> {"A", "B"} or {"router", "A", "B"} -> input name; a
program with fixed-size branch buffers records ``"branch_buffers"`` instead). The base weights
are never edited:

- LoRA / pruned SoRA (``LoraDelta``; A (r, in), B (out, r), alpha / r folded in):
  ``y = W0 x + (s B) (A x)`` — the scale ``s`` is folded into B. The variant's rank dimension
  is dynamic but *one* symbol shared by every branch, so all branches are zero-padded to the
  adapter's largest rank R (A (R, in), B (out, R); the padding adds exact zeros) — pruned SoRA
  with per-matrix ranks and weights the adapter leaves alone (all zero) both run.
- SiRA (``SiraBranch``; router (E, in), A (E, r, in), B (E, out, r)):
  ``y = W0 x + s * sum_{e in topk(x)} p_e(x) B_e A_e x``, ``s`` folded into B; E, r, top_k and
  capacity_factor must equal the variant's (they are baked into its graph); untouched live
  weights get all-zero branches (zero B: no contribution).

:func:`prepare_branches` validates and maps an adapter once (torch-free, numpy); a backend's
:class:`VariantRoute` takes the tensors and runs the variant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from edgeadapt.errors import (
    AdapterFormatError,
    BundleError,
    FingerprintMismatchError,
    SwitchError,
    TargetMismatchError,
)
from edgeadapt.format.manifest import Manifest
from edgeadapt.format.types import Adapter, LoraDelta, SiraBranch

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


def variant_spec(manifest: Manifest, key: str, section: str) -> dict:
    """The variant's entry for one backend (``section``: the bundle.json key of the backend's
    files, :attr:`edgeadapt.runtime.backends.Backend.section`); BundleError if absent."""
    v = manifest.variants.get(key)
    if v is None:
        raise BundleError(f"graph variant {key!r} is not in the bundle")
    spec = v.get(section)
    if not spec or "file" not in spec:
        raise BundleError(f"graph variant {key!r} has no {section} graph; re-export the adapter "
                          f"with --backends including {section}")
    return spec


def _f32(arr: np.ndarray, shape: tuple[int, ...], where: str) -> np.ndarray:
    a = np.asarray(arr)
    if a.shape != shape:
        raise AdapterFormatError(f"{where}: shape {a.shape}, the variant expects {shape}")
    a = np.ascontiguousarray(a, dtype=np.float32)
    if not np.isfinite(a).all():
        raise AdapterFormatError(f"{where}: non-finite values")
    return a


def prepare_branches(adapter: Adapter, name: str, manifest: Manifest, key: str,
                     section: str) -> PreparedBranches:
    """Validate ``adapter`` against variant ``key`` (its ``section`` entry: see
    :func:`variant_spec`) and map it to the variant's branch inputs.

    Every branch input of the variant gets a tensor: the adapter's (B tensors marked for the
    scale) or a zero branch. Raises TargetMismatchError (weight without a branch),
    FingerprintMismatchError (other base), AdapterFormatError (shapes, non-finite values),
    SwitchError (the adapter's method or SiRA shape does not fit the variant).
    """
    spec_of = variant_spec(manifest, key, section)
    branch = manifest.variants[key].get("branch", {})
    kind = branch.get("kind")
    # graph inputs {"A": input, ...}; buffers {"lora_A": buffer, ...} -> {"A": buffer, ...}
    buffers = "branch_buffers" in spec_of  # fixed shapes: LoRA padded to the variant's rank
    names = {w: {k.split("_", 1)[1] if k.startswith(("lora_", "sira_")) else k: v
                 for k, v in d.items()}
             for w, d in (spec_of.get("branch_inputs") or spec_of.get("branch_buffers")
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
    if kind == "lora" and buffers:  # fixed-size branch buffers: pad to the variant's rank
        if rmax > int(spec[1]):
            raise SwitchError(f"adapter {name!r}: LoRA rank {rmax} exceeds the rank "
                              f"{spec[1]} of variant {key!r}'s {section} buffers")
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


class VariantRoute(Protocol):
    """What ``Runtime.run`` routes through while an unfused adapter is active (a backend's
    ``open_variant``): ``check_branches`` raises BundleError unless the tensors fit, before
    anything changes; ``set_branches`` makes them the branch tensors (called with runs
    excluded); ``run`` is one forward through the variant."""

    key: str

    def check_branches(self, feeds: dict[str, np.ndarray],
                       head: dict[str, np.ndarray] | None = None) -> None: ...

    def set_branches(self, feeds: dict[str, np.ndarray],
                     head: dict[str, np.ndarray] | None = None) -> None: ...

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray: ...
