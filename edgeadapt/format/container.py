"""A strict reader and an atomic writer for the safetensors container (spec: docs/format.md §1).

Layout: ``u64 LE header length N | N bytes JSON header | data buffer``. The header maps tensor
names to ``{"dtype", "shape", "data_offsets"}`` and carries ``"__metadata__"`` (str -> str).
edgeadapt adds a whole-file checksum in ``__metadata__["checksum"]``: sha256 of the file with
the checksum's own 64 hex digits replaced by ``0``. Every problem raises AdapterFormatError.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import re
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeadapt.errors import AdapterFormatError, WriteError

MAX_HEADER_BYTES = 16 * 1024 * 1024
CHECKSUM_KEY = "checksum"
_ZERO_SUM = "0" * 64
_HEX64 = re.compile(r"[0-9a-f]{64}")

#: safetensors dtype name -> numpy dtype (BF16 is read as its uint16 bit patterns).
DTYPES: dict[str, np.dtype] = {
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "U8": np.dtype("u1"),
    "U16": np.dtype("<u2"),
    "U32": np.dtype("<u4"),
    "U64": np.dtype("<u8"),
    "I8": np.dtype("i1"),
    "I16": np.dtype("<i2"),
    "I32": np.dtype("<i4"),
    "I64": np.dtype("<i8"),
    "BOOL": np.dtype("?"),
}


@dataclass(frozen=True)
class Tensor:
    """One tensor to write: safetensors dtype name and a C-ordered array of that dtype's layout."""

    dtype: str
    array: np.ndarray


@dataclass
class Container:
    """A validated file: metadata, and tensors as read-only views of the mapped file.

    dtypes: tensor name -> safetensors dtype name (tells BF16 apart from U16).
    """

    path: Path
    metadata: dict[str, str]
    tensors: dict[str, np.ndarray]
    dtypes: dict[str, str]


def check_writable_dir(path: str | os.PathLike, what: str = "") -> Path:
    """Refuse, before any work, a path that cannot become a writable directory: the nearest
    existing path at or above ``path`` must be a directory this process can write into
    (``f/sub`` with ``f`` a file, or a read-only parent: WriteError naming it, prefixed by
    ``what``, e.g. ``"--out "``). Nothing is created. Returns ``path``."""
    path = Path(path)
    probe = path
    while not probe.exists() and not probe.is_symlink() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        why = "is not a directory" if probe.exists() else "does not exist (a broken link?)"
        raise WriteError(f"{what}{path}: {probe} {why}; choose another directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise WriteError(f"{what}{path}: {probe} is not writable; choose another directory")
    return path


def atomic_write_bytes(path: str | os.PathLike, chunks: list[bytes | memoryview]) -> None:
    """Write ``chunks`` to ``path`` atomically: temp file in the same directory, fsync, replace."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise WriteError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual file mode
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, WriteError):
            raise WriteError(f"cannot write {path}: {exc.strerror or exc}") from exc
        raise
    try:  # make the rename itself durable where the platform allows it
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def encode(tensors: dict[str, Tensor], metadata: dict[str, str]) -> list[bytes | memoryview]:
    """The file's bytes as chunks: length, header (with checksum filled in), tensor data."""
    header: dict[str, object] = {"__metadata__": {**metadata, CHECKSUM_KEY: _ZERO_SUM}}
    offset = 0
    datas: list[memoryview] = []
    for name, t in tensors.items():
        if t.dtype not in DTYPES:
            raise AdapterFormatError(f"unknown dtype {t.dtype!r} for tensor {name!r}")
        arr = np.ascontiguousarray(t.array, dtype=DTYPES[t.dtype])
        nbytes = arr.nbytes
        header[name] = {
            "dtype": t.dtype,
            "shape": [int(s) for s in arr.shape],
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
        datas.append(memoryview(arr.reshape(-1).view(np.uint8)))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    raw = text.encode()
    raw += b" " * (-(8 + len(raw)) % 8)  # keep the data buffer 8-byte aligned
    prefix = struct.pack("<Q", len(raw))
    h = hashlib.sha256(prefix)
    h.update(raw)
    for d in datas:
        h.update(d)
    digest = h.hexdigest().encode()
    raw = raw.replace(f'"{CHECKSUM_KEY}":"{_ZERO_SUM}"'.encode(), f'"{CHECKSUM_KEY}":"'.encode()
                      + digest + b'"', 1)
    return [prefix, raw, *datas]


def write_container(path: str | os.PathLike, tensors: dict[str, Tensor],
                    metadata: dict[str, str]) -> None:
    """Write a container file atomically (see :func:`encode`)."""
    atomic_write_bytes(path, encode(tensors, metadata))


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _reject_constant(name: str) -> None:
    raise ValueError(f"non-standard JSON constant {name}")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_container(path: str | os.PathLike, expected_format: str | None = None) -> Container:
    """Read and fully validate a container (docs/format.md §1); tensors are mmap views."""
    path = Path(path)

    def fail(msg: str) -> AdapterFormatError:
        return AdapterFormatError(f"{path}: {msg}")

    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise fail(f"truncated file: {size} bytes, shorter than the 8-byte header length")
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as exc:
        raise AdapterFormatError(f"{path}: cannot read: {exc}") from exc
    mv = memoryview(buf)
    (n,) = struct.unpack("<Q", mv[:8])
    if n < 2 or n > MAX_HEADER_BYTES:
        raise fail(f"header length {n} outside [2, {MAX_HEADER_BYTES}] (corrupt or not an "
                   "edgeadapt file)")
    if 8 + n > size:
        raise fail(f"truncated file: header claims {n} bytes but only {size - 8} follow")
    raw = bytes(mv[8:8 + n])
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates,
                            parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise fail(f"header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise fail("header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise fail("header has no __metadata__ mapping strings to strings")
    for key in ("format", "version", CHECKSUM_KEY):
        if key not in metadata:
            raise fail(f"metadata lacks {key!r}")
    if expected_format is not None and metadata["format"] != expected_format:
        raise fail(f"format is {metadata['format']!r}, expected {expected_format!r}")
    _verify_checksum(mv, n, raw, metadata[CHECKSUM_KEY], fail)

    data_start = 8 + n
    data_len = size - data_start
    entries = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise fail(f"tensor {name!r}: entry must have exactly dtype, shape, data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise fail(f"tensor {name!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
            raise fail(f"tensor {name!r}: shape {shape!r} is not a list of non-negative ints")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(_is_int(o) for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
            raise fail(f"tensor {name!r}: bad data_offsets {offsets!r}")
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise fail(f"tensor {name!r}: shape {shape} of {dtype} needs {nbytes} bytes, "
                       f"data_offsets span {offsets[1] - offsets[0]}")
        entries.append((offsets[0], offsets[1], name, dtype, shape))
    entries.sort()
    pos = 0
    for begin, end, name, _, _ in entries:
        if begin != pos:
            kind = "overlaps the previous tensor" if begin < pos else "leaves a gap"
            raise fail(f"tensor {name!r} at offset {begin} {kind} (expected {pos})")
        pos = end
    if pos != data_len:
        what = "truncated file" if pos > data_len else "trailing bytes"
        raise fail(f"{what}: tensors need {pos} data bytes, file has {data_len}")

    tensors: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    for begin, _end, name, dtype, shape in entries:
        arr = np.frombuffer(buf, dtype=DTYPES[dtype], count=math.prod(shape),
                            offset=data_start + begin)
        tensors[name] = arr.reshape(shape)
        dtypes[name] = dtype
    return Container(path=path, metadata=metadata, tensors=tensors, dtypes=dtypes)


def _verify_checksum(mv: memoryview, n: int, raw: bytes, stored: str, fail) -> None:
    if not _HEX64.fullmatch(stored):
        raise fail("checksum is not 64 lowercase hex digits")
    field = f'"{CHECKSUM_KEY}":"{stored}"'.encode()
    if raw.count(field) != 1:
        raise fail("header was edited: checksum field not in canonical form")
    h = hashlib.sha256(mv[:8])
    h.update(raw.replace(field, f'"{CHECKSUM_KEY}":"{_ZERO_SUM}"'.encode()))
    h.update(mv[8 + n:])
    if h.hexdigest() != stored:
        raise fail("checksum mismatch: the file is corrupt or was edited after it was written")


def read_json_object(path: Path, missing: str) -> dict:
    """A JSON object from ``path``; anything else (missing, unreadable, not UTF-8, not JSON,
    not an object) is an AdapterFormatError naming the file. ``missing``: what a missing file
    means, for the message (e.g. "not a training run directory")."""
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise AdapterFormatError(f"{path} is missing: {missing}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise AdapterFormatError(f"{path} is not valid JSON: {exc}") from exc
    except OSError as exc:
        raise AdapterFormatError(f"{path} cannot be read: {exc.strerror or exc}") from exc
    if not isinstance(obj, dict):
        raise AdapterFormatError(f"{path} must hold a JSON object, got {type(obj).__name__}")
    return obj
