"""Adapters validated against a store and mapped to its layouts (numpy only, no torch).

:func:`prepare_adapter` checks an adapter completely (live targets, shapes, base fingerprints,
indices, finite values) before any switch uses it, and maps SHiRA positions to the backend's
flat indices (``edgeadapt.format.layout``); the engine then switches with the result as often
as asked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from edgeadapt.errors import (
    AdapterFormatError,
    FingerprintMismatchError,
    SwitchError,
    TargetMismatchError,
)
from edgeadapt.format.layout import to_backend
from edgeadapt.format.types import Adapter, LoraDelta, ShiraDelta, SiraBranch
from edgeadapt.runtime.store import LiveWeight, to_backend_index


@dataclass(frozen=True)
class _Target:
    """One adapter's delta on one weight, in backend coordinates.

    Sparse: idx (K,) sorted int64 backend flat indices, val (K,) float32.
    Dense: A (r, in), B (out, r) float32 (torch orientation).
    """

    idx: np.ndarray | None = None
    val: np.ndarray | None = None
    A: np.ndarray | None = None
    B: np.ndarray | None = None


@dataclass(frozen=True)
class PreparedAdapter:
    """An adapter checked against a store and mapped to its layouts; reuse it for every switch."""

    name: str
    method: str
    scale: float
    targets: dict[str, _Target]
    head: dict[str, np.ndarray] = field(default_factory=dict)  # backend layout, float32


def _check_finite(arr: np.ndarray, what: str) -> None:
    if not np.isfinite(arr).all():
        raise AdapterFormatError(f"{what}: non-finite values (NaN or inf)")


def prepare_adapter(adapter: Adapter, live: dict[str, LiveWeight], name: str) -> PreparedAdapter:
    """Validate ``adapter`` completely against the live weights and map it to backend indices.

    Raises TargetMismatchError (weight not live), FingerprintMismatchError (other base),
    AdapterFormatError (bad shapes, indices, non-finite values), SwitchError (SiRA: unfused only).
    """
    if not math.isfinite(adapter.scale):
        raise AdapterFormatError(f"adapter {name!r}: scale {adapter.scale} is not finite")
    missing = sorted(set(adapter.targets) - set(live))
    if missing:
        raise TargetMismatchError(
            f"adapter {name!r} touches weights that are not live in this runtime: {missing}; "
            "re-export the base with --targets covering them"
        )
    targets: dict[str, _Target] = {}
    for wname, delta in adapter.targets.items():
        lw = live[wname]
        where = f"adapter {name!r}, weight {wname!r}"
        shape = tuple(int(s) for s in adapter.shapes.get(wname, ()))
        if shape != lw.shape:
            raise FingerprintMismatchError(
                f"{where}: shape {shape} != base shape {lw.shape} (adapter for another base?)"
            )
        if lw.sha256 is not None:
            got = adapter.weight_sha256.get(wname)
            if got != lw.sha256:
                raise FingerprintMismatchError(
                    f"{where}: trained on a base weight with sha256 {got}, this base has "
                    f"{lw.sha256}"
                )
        targets[wname] = _prepare_target(delta, lw, where)
    return PreparedAdapter(name, adapter.method, float(adapter.scale), targets,
                           _prepare_head(adapter, live, name))


def _prepare_head(adapter: Adapter, live: dict[str, LiveWeight], name: str
                  ) -> dict[str, np.ndarray]:
    """The adapter's task head in backend layout (a full replacement; see Adapter.head)."""
    head: dict[str, np.ndarray] = {}
    for wname, arr in adapter.head.items():
        where = f"adapter {name!r}, head {wname!r}"
        if wname not in live:
            raise TargetMismatchError(f"{where}: not a live weight of this runtime")
        if wname in adapter.targets:
            raise AdapterFormatError(f"{where}: a weight cannot be both a head and a target")
        arr = np.asarray(arr, dtype=np.float32)
        lw = live[wname]
        if arr.shape != lw.shape:
            raise FingerprintMismatchError(f"{where}: shape {arr.shape} != {lw.shape}")
        _check_finite(arr, where)
        head[wname] = to_backend(arr, lw.layout)
    return head


def _prepare_target(delta: object, lw: LiveWeight, where: str) -> _Target:
    out, inp = lw.shape
    if isinstance(delta, ShiraDelta):
        idx = np.asarray(delta.indices)
        val = np.asarray(delta.values)
        if idx.ndim != 1 or val.shape != idx.shape or not np.issubdtype(idx.dtype, np.integer):
            raise AdapterFormatError(f"{where}: SHiRA indices/values must be equal-length 1-D")
        idx = idx.astype(np.int64)
        if idx.size and (idx[0] < 0 or idx[-1] >= out * inp or np.any(np.diff(idx) <= 0)):
            raise AdapterFormatError(
                f"{where}: SHiRA indices must be strictly increasing in [0, {out * inp})"
            )
        val = val.astype(np.float32)
        _check_finite(val, where)
        bidx = to_backend_index(idx, lw.shape, lw.layout)
        if lw.layout != "as-is":
            order = np.argsort(bidx, kind="stable")
            bidx, val = bidx[order], val[order]
        return _Target(idx=bidx, val=val)
    if isinstance(delta, LoraDelta):
        A = np.asarray(delta.A, dtype=np.float32)
        B = np.asarray(delta.B, dtype=np.float32)
        if A.ndim != 2 or B.ndim != 2 or A.shape[1] != inp or B.shape[0] != out \
                or A.shape[0] != B.shape[1]:
            raise AdapterFormatError(
                f"{where}: LoRA A {A.shape} / B {B.shape} do not fit weight {(out, inp)}"
            )
        _check_finite(A, where + " (A)")
        _check_finite(B, where + " (B)")
        return _Target(A=A, B=B)
    if isinstance(delta, SiraBranch):
        raise SwitchError(f"{where}: SiRA routes per token and cannot be fused; it runs "
                          "unfused, through a graph variant (`edgeadapt export adapter` adds "
                          "one): switch to it alone")
    raise AdapterFormatError(f"{where}: unknown delta type {type(delta).__name__}")
