"""The ``.eadp`` adapter file: write and fully validated read (spec: docs/format.md §2).

``write_adapter(path, adapter, value_dtype)`` stores an :class:`~edgeadapt.format.types.Adapter`;
``read_adapter(path, manifest)`` returns it with float32 values (exact widening of the stored
dtype) after checking everything, or raises AdapterFormatError / FingerprintMismatchError /
TargetMismatchError naming the file and the problem.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgeadapt.errors import AdapterFormatError, FingerprintMismatchError, TargetMismatchError
from edgeadapt.format.codecs import (
    ESCAPE_DTYPES,
    GAP_DTYPES,
    bf16_bits_to_f32,
    decode_positions,
    encode_positions,
    f32_to_bf16_bits,
)
from edgeadapt.format.container import Tensor, read_container, write_container
from edgeadapt.format.fingerprint import fingerprint
from edgeadapt.format.types import METHODS, Adapter, LoraDelta, ShiraDelta, SiraBranch

if TYPE_CHECKING:
    from edgeadapt.format.manifest import Manifest

FORMAT_NAME = "edgeadapt-adapter"
FORMAT_VERSION = 1
VALUE_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
_MAX_NUMEL = 2**48
#: what ``repr(float)`` writes (``float()`` alone would also take "1_0" or " 1.0 ")
_FLOAT_REPR = re.compile(r"[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|inf|nan)")
_PARTS = {"shira": ("gaps", "escapes", "values"), "lora": ("A", "B"), "sora": ("A", "B"),
          "sira": ("router", "A", "B")}


def _delta_kind(method: str) -> type:
    return {"shira": ShiraDelta, "lora": LoraDelta, "sora": LoraDelta, "sira": SiraBranch}[method]


def _encode_values(x: np.ndarray, st_dtype: str, where: str) -> np.ndarray:
    x32 = np.asarray(x)
    if not np.all(np.isfinite(x32)):
        raise AdapterFormatError(f"refusing to write {where}: non-finite values")
    x32 = x32.astype(np.float32)
    if st_dtype == "BF16":
        out = f32_to_bf16_bits(x32)
        back = bf16_bits_to_f32(out)
    else:
        with np.errstate(over="ignore"):  # overflow is reported just below
            out = x32.astype(np.float16 if st_dtype == "F16" else np.float32)
        back = out
    if not np.all(np.isfinite(back)):
        raise AdapterFormatError(f"refusing to write {where}: values overflow {st_dtype}")
    return out


def write_adapter(path: str | os.PathLike, adapter: Adapter, value_dtype: str = "float16") -> Path:
    """Write ``adapter`` to ``path`` atomically; float tensors are stored as ``value_dtype``
    (``float16`` | ``bfloat16`` | ``float32``). Returns the path."""
    if value_dtype not in VALUE_DTYPES:
        raise AdapterFormatError(f"value_dtype {value_dtype!r} not one of {list(VALUE_DTYPES)}")
    if adapter.method not in METHODS:
        raise AdapterFormatError(f"unknown method {adapter.method!r}; expected one of {METHODS}")
    if not math.isfinite(float(adapter.scale)):
        raise AdapterFormatError(f"scale {adapter.scale!r} is not finite")
    st = VALUE_DTYPES[value_dtype]
    kind = _delta_kind(adapter.method)
    tensors: dict[str, Tensor] = {}
    targets = []
    for name, delta in adapter.targets.items():
        where = f"target {name!r}"
        if "/" in name or not name:
            raise AdapterFormatError(f"{where}: weight names must be non-empty without '/'")
        if not isinstance(delta, kind):
            raise AdapterFormatError(f"{where}: {type(delta).__name__} in a {adapter.method} "
                                     "adapter")
        if name not in adapter.shapes or name not in adapter.weight_sha256:
            raise AdapterFormatError(f"{where}: no shape or weight_sha256 recorded")
        out_f, in_f = (int(s) for s in adapter.shapes[name])
        entry: dict[str, object] = {"name": name, "shape": [out_f, in_f],
                                    "sha256": adapter.weight_sha256[name]}
        if isinstance(delta, ShiraDelta):
            idx = np.asarray(delta.indices).reshape(-1)
            if idx.size and (not np.all(np.diff(idx) > 0) or idx[0] < 0
                             or idx[-1] >= out_f * in_f):
                raise AdapterFormatError(f"refusing to write {where}: indices must be strictly "
                                         f"increasing in [0, {out_f * in_f})")
            if np.asarray(delta.values).shape != idx.shape:
                raise AdapterFormatError(f"{where}: {idx.size} indices but values of shape "
                                         f"{np.asarray(delta.values).shape}")
            gdt, gaps, edt, escapes = encode_positions(idx)
            tensors[f"{name}/gaps"] = Tensor(gdt, gaps)
            tensors[f"{name}/escapes"] = Tensor(edt, escapes)
            tensors[f"{name}/values"] = Tensor(st, _encode_values(delta.values, st, where))
            entry["nnz"] = int(idx.size)
        elif isinstance(delta, LoraDelta):
            _check_shape(delta.A, (delta.rank, in_f), f"{where} A")
            _check_shape(delta.B, (out_f, delta.rank), f"{where} B")
            tensors[f"{name}/A"] = Tensor(st, _encode_values(delta.A, st, where))
            tensors[f"{name}/B"] = Tensor(st, _encode_values(delta.B, st, where))
            entry["rank"] = delta.rank
        else:
            e, r = delta.num_experts, int(np.asarray(delta.A).shape[1])
            _check_shape(delta.router, (e, in_f), f"{where} router")
            _check_shape(delta.A, (e, r, in_f), f"{where} A")
            _check_shape(delta.B, (e, out_f, r), f"{where} B")
            _check_sira(int(delta.top_k), float(delta.capacity_factor), e, where)
            for part in ("router", "A", "B"):
                tensors[f"{name}/{part}"] = Tensor(st, _encode_values(getattr(delta, part), st,
                                                                      where))
            entry.update(experts=e, rank=r, top_k=int(delta.top_k),
                         capacity_factor=float(delta.capacity_factor))
        targets.append(entry)
    heads = []
    for name, arr in adapter.head.items():
        where = f"head {name!r}"
        if "/" in name or not name or name in adapter.targets:
            raise AdapterFormatError(f"{where}: head names must be non-empty, without '/', and "
                                     "not also a target")
        arr = np.asarray(arr)
        if arr.ndim != 2 or 0 in arr.shape:
            raise AdapterFormatError(f"{where}: a head is a non-empty (out, in) matrix, got shape "
                                     f"{arr.shape}")
        tensors[f"{name}/head"] = Tensor("F32", _encode_values(arr, "F32", where))
        heads.append({"name": name, "shape": [int(arr.shape[0]), int(arr.shape[1])]})
    metadata = {
        "format": FORMAT_NAME,
        "version": str(FORMAT_VERSION),
        "method": adapter.method,
        "value_dtype": value_dtype,
        "scale": repr(float(adapter.scale)),
        "fingerprint": fingerprint({t["name"]: t["sha256"] for t in targets}),
        "targets": json.dumps(targets, allow_nan=False),
        "head": json.dumps(heads),
        "meta": json.dumps(adapter.meta, allow_nan=False, default=_jsonable),
    }
    write_container(path, tensors, metadata)
    return Path(path)


def _jsonable(x: object) -> object:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"adapter.meta value {x!r} is not JSON-serialisable")


def _check_shape(arr: np.ndarray, shape: tuple[int, ...], where: str) -> None:
    if tuple(np.asarray(arr).shape) != tuple(shape):
        raise AdapterFormatError(f"{where}: shape {tuple(np.asarray(arr).shape)}, expected "
                                 f"{tuple(shape)}")


def _check_sira(top_k: int, capacity_factor: float, experts: int, where: str) -> None:
    if not 1 <= top_k <= experts:
        raise AdapterFormatError(f"{where}: top_k {top_k} outside [1, {experts}]")
    if not (math.isfinite(capacity_factor) and capacity_factor > 0):
        raise AdapterFormatError(f"{where}: capacity_factor {capacity_factor} must be > 0")


# ----------------------------------------------------------------------------------- reading


def read_adapter(path: str | os.PathLike, manifest: Manifest | None = None) -> Adapter:
    """Read and validate an ``.eadp`` file (docs/format.md §2); values come back as float32.

    With ``manifest``, also check every target against the bundle's adaptable weights: present
    (else TargetMismatchError), same shape, same base sha256 (else FingerprintMismatchError).
    """
    path = Path(path)
    c = read_container(path, expected_format=FORMAT_NAME)
    try:
        adapter = _decode(c.metadata, c.tensors, c.dtypes)
    except _InvalidError as exc:
        raise AdapterFormatError(f"{path}: {exc}") from None
    if manifest is not None:
        check_against_manifest(adapter, manifest, str(path))
    return adapter


class _InvalidError(Exception):
    pass


def _reject_constant(name: str) -> None:
    raise ValueError(f"non-standard JSON constant {name}")


def _json(md: dict[str, str], key: str, kind: type) -> object:
    if key not in md:
        raise _InvalidError(f"metadata lacks {key!r}")
    try:
        value = json.loads(md[key], parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise _InvalidError(f"metadata {key!r} is not valid JSON: {exc}") from None
    if not isinstance(value, kind):
        raise _InvalidError(f"metadata {key!r} is not a JSON {kind.__name__}")
    return value


def _int_field(entry: dict, key: str, where: str, low: int = 0) -> int:
    v = entry.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
        raise _InvalidError(f"{where}: {key!r} must be an integer >= {low}, got {v!r}")
    return v


def _decode(md: dict[str, str], tensors: dict[str, np.ndarray], dtypes: dict[str, str]) -> Adapter:
    try:
        version = int(md["version"])
    except ValueError:
        raise _InvalidError(f"version {md['version']!r} is not an integer") from None
    if version > FORMAT_VERSION:
        raise _InvalidError(f"format version {version} was written by a newer edgeadapt (this one "
                       f"reads up to {FORMAT_VERSION})")
    if version < 1:
        raise _InvalidError(f"format version {version} is invalid")
    method = md.get("method")
    if method not in METHODS:
        raise _InvalidError(f"unknown method {method!r}")
    value_dtype = md.get("value_dtype")
    if value_dtype not in VALUE_DTYPES:
        raise _InvalidError(f"unknown value_dtype {value_dtype!r}")
    st = VALUE_DTYPES[value_dtype]
    text = md.get("scale", "")
    if not isinstance(text, str) or not _FLOAT_REPR.fullmatch(text):
        raise _InvalidError(f"scale {text!r} is not a number (the repr of a float)")
    scale = float(text)
    if not math.isfinite(scale):
        raise _InvalidError(f"scale {scale} is not finite")
    targets = _json(md, "targets", list)
    meta = _json(md, "meta", dict)

    expected_names = set()
    out = Adapter(method=method, targets={}, shapes={}, weight_sha256={}, scale=scale, meta=meta)
    for i, entry in enumerate(targets):
        if not isinstance(entry, dict):
            raise _InvalidError(f"targets[{i}] is not an object")
        name = entry.get("name")
        if not isinstance(name, str) or not name or "/" in name:
            raise _InvalidError(f"targets[{i}]: bad weight name {name!r}")
        where = f"target {name!r}"
        if name in out.targets:
            raise _InvalidError(f"{where} listed twice")
        shape = entry.get("shape")
        if (not isinstance(shape, list) or len(shape) != 2
                or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1
                           for s in shape)):
            raise _InvalidError(f"{where}: shape {shape!r} is not [out, in] of positive ints")
        out_f, in_f = shape
        if out_f * in_f > _MAX_NUMEL:
            raise _InvalidError(f"{where}: shape {shape} is implausibly large")
        sha = entry.get("sha256")
        if not isinstance(sha, str) or len(sha) != 64 or any(ch not in "0123456789abcdef"
                                                             for ch in sha):
            raise _InvalidError(f"{where}: sha256 {sha!r} is not 64 lowercase hex digits")
        parts = {}
        for part in _PARTS[method]:
            key = f"{name}/{part}"
            if key not in tensors:
                raise _InvalidError(f"{where}: tensor {key!r} missing")
            expected_names.add(key)
            parts[part] = (tensors[key], dtypes[key])
        out.targets[name] = _decode_delta(method, parts, entry, st, out_f, in_f, where)
        out.shapes[name] = (out_f, in_f)
        out.weight_sha256[name] = sha
    # "head" is optional so that files written before heads existed still read.
    heads = _json(md, "head", list) if "head" in md else []
    for i, entry in enumerate(heads):
        name = entry.get("name") if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name or "/" in name or name in out.targets \
                or name in out.head:
            raise _InvalidError(f"head[{i}]: bad or repeated weight name {name!r}")
        if (not isinstance(shape, list) or len(shape) != 2
                or not all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= 2**24
                           for d in shape)):
            raise _InvalidError(f"head {name!r}: shape {shape!r} is not [out, in]")
        key = f"{name}/head"
        if key not in tensors:
            raise _InvalidError(f"head {name!r}: tensor {key!r} missing")
        expected_names.add(key)
        arr, dt = tensors[key], dtypes[key]
        if tuple(arr.shape) != tuple(shape):
            raise _InvalidError(f"head {name!r}: tensor shape {list(arr.shape)} != {shape}")
        out.head[name] = _values(arr, dt, "F32", f"head {name!r}")
    extra = sorted(set(tensors) - expected_names)
    if extra:
        raise _InvalidError(f"tensors not belonging to any target: {extra[:5]}")
    if md.get("fingerprint") != fingerprint(out.weight_sha256):
        raise _InvalidError("fingerprint does not match the targets' sha256 (hand-edited header?)")
    return out


def _values(arr: np.ndarray, dt: str, st: str, where: str) -> np.ndarray:
    if dt != st:
        raise _InvalidError(f"{where}: dtype {dt}, expected {st} (the file's value_dtype)")
    v = bf16_bits_to_f32(arr) if st == "BF16" else arr.astype(np.float32)  # copies out of mmap
    if not np.all(np.isfinite(v)):
        raise _InvalidError(f"{where}: non-finite values (NaN or Inf)")
    return v


def _decode_delta(method: str, parts: dict, entry: dict, st: str, out_f: int, in_f: int,
                  where: str):
    def shaped(part: str, shape: tuple[int, ...]) -> np.ndarray:
        arr, dt = parts[part]
        if tuple(arr.shape) != shape:
            raise _InvalidError(f"{where}: {part} has shape {list(arr.shape)}, expected "
                                f"{list(shape)}")
        return _values(arr, dt, st, f"{where} {part}")

    if method == "shira":
        k = _int_field(entry, "nnz", where)
        if k > out_f * in_f:
            raise _InvalidError(f"{where}: nnz {k} exceeds the weight's {out_f * in_f} elements")
        gaps, gdt = parts["gaps"]
        escapes, edt = parts["escapes"]
        if gdt not in GAP_DTYPES or edt not in ESCAPE_DTYPES:
            raise _InvalidError(f"{where}: gap/escape dtypes {gdt}/{edt} not in {GAP_DTYPES}/"
                           f"{ESCAPE_DTYPES}")
        if gaps.shape != (k,) or escapes.ndim != 1:
            raise _InvalidError(f"{where}: gaps shape {list(gaps.shape)} / escapes shape "
                           f"{list(escapes.shape)}, expected [{k}] / [M]")
        try:
            indices = decode_positions(gaps, gdt, escapes, out_f * in_f)
        except ValueError as exc:
            raise _InvalidError(f"{where}: {exc}") from None
        return ShiraDelta(indices=indices, values=shaped("values", (k,)))
    if method in ("lora", "sora"):
        r = _int_field(entry, "rank", where)
        return LoraDelta(A=shaped("A", (r, in_f)), B=shaped("B", (out_f, r)))
    e = _int_field(entry, "experts", where, low=1)
    r = _int_field(entry, "rank", where)
    top_k = _int_field(entry, "top_k", where, low=1)
    cf = entry.get("capacity_factor")
    if not isinstance(cf, (int, float)) or isinstance(cf, bool):
        raise _InvalidError(f"{where}: capacity_factor {cf!r} is not a number")
    try:
        _check_sira(top_k, float(cf), e, where)
    except AdapterFormatError as exc:
        raise _InvalidError(str(exc)) from None
    return SiraBranch(router=shaped("router", (e, in_f)), A=shaped("A", (e, r, in_f)),
                      B=shaped("B", (e, out_f, r)), top_k=top_k, capacity_factor=float(cf))


def check_against_manifest(adapter: Adapter, manifest: Manifest, where: str = "adapter") -> None:
    """Check ``adapter`` fits the bundle: targets adaptable (TargetMismatchError), shapes equal
    (AdapterFormatError), base weights identical by sha256 (FingerprintMismatchError)."""
    missing = sorted(n for n in adapter.targets if n not in manifest.weights)
    if missing:
        raise TargetMismatchError(
            f"{where}: touches weights the bundle does not expose as adaptable: "
            f"{', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''} (bundle targets_spec "
            f"{manifest.targets_spec!r}; re-export the base with a --targets that covers them)")
    heads = set(manifest.heads)
    stray = sorted(n for n in adapter.head if n not in heads)
    if stray:
        raise TargetMismatchError(
            f"{where}: carries a task head for {', '.join(stray)}, which the bundle does not "
            f"expose as a live head (bundle heads: {sorted(heads) or 'none'}; a causal-lm bundle "
            "has no head: train the adapter on the bundle's model)")
    for name, arr in adapter.head.items():
        if tuple(arr.shape) != tuple(manifest.weights[name].shape):
            raise AdapterFormatError(f"{where}: head {name!r} has shape {list(arr.shape)}, the "
                                     f"bundle's {list(manifest.weights[name].shape)} (another "
                                     "number of labels?)")
    for name in adapter.targets:
        w = manifest.weights[name]
        if tuple(adapter.shapes[name]) != tuple(w.shape):
            raise AdapterFormatError(f"{where}: target {name!r} has shape "
                                     f"{list(adapter.shapes[name])}, the bundle's weight "
                                     f"{list(w.shape)}")
    wrong = sorted(n for n in adapter.targets if adapter.weight_sha256[n] != manifest.weights[n]
                   .sha256)
    if wrong:
        raise FingerprintMismatchError(
            f"{where}: trained on a different base model: base weight sha256 differs for "
            f"{', '.join(wrong[:4])}{' ...' if len(wrong) > 4 else ''} (bundle model "
            f"{manifest.model!r}, fingerprint {manifest.fingerprint[:12]})")
