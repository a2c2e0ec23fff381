"""int4 codes packed two per byte in the blocked32 layout (numpy only, torch-free; the one home
of the nibble arithmetic).

A quantized live weight on an int4 grid (:mod:`edgeadapt.format.quant`) has codes
``q in [-8, 7]``, one per byte in the blocked32 layout ``Q (out/32, in, 32)``
(:mod:`edgeadapt.format.layout`). Where edgeadapt's ONNX Runtime kernel reads them
(``edgeadapt.Q4BlockedMatMul``), the live buffer holds them packed, ``P (out/32, in, 16)``
uint8, half the bytes a forward reads::

    P[b, c, j] = (Q[b, c, j] + 8) | ((Q[b, c, j + 16] + 8) << 4)        j < 16

(offset binary: a nibble ``n = q + 8``, ``q = n - 8``). Column ``j`` of a 32-column block is
the low nibble, column ``j + 16`` the high one, so one 16-byte row of a block unpacks into the
two 16-float halves a vector kernel accumulates.

A code's *position* stays its blocked32 flat index ``p`` (the switch engine's backend index):
it lives in byte ``(p >> 5) * 16 + (p & 15)`` of the packed buffer, in its high nibble iff
``p & 16``. Writing one code is a read-modify-write of its byte (the switch's native scatter,
:mod:`edgeadapt.runtime.scatter`; :func:`scatter` here is the numpy form).

The arithmetic needs only that a code array's flat codes run in blocks of 32 along its last
dimension (:func:`block_shape`). edgeadapt's ExecuTorch kernel (``edgeadapt::live_q4linear``)
reads the as-is layout ``Q (out, in)`` packed so: cut into ``(out, in/32, 32)``, packed into
``(out, in/32, 16)``, the code at as-is flat index ``p = r * in + c`` sits in the byte and
nibble the same rule gives (``in`` a multiple of 32).
"""

from __future__ import annotations

import numpy as np

from edgeadapt.format.layout import AS_IS, BLOCKED, backend_shape

#: codes a packed int4 buffer holds per byte
PER_BYTE = 2
#: code columns per blocked32 row, bytes per packed row
BLOCK, HALF = 32, 16
OFFSET = 8


def packed_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The packed shape of codes of shape ``(..., 32)``: ``(..., 16)``."""
    if not shape or shape[-1] != BLOCK:
        raise ValueError(f"int4 packing needs blocked32 codes (..., {BLOCK}), not {shape}")
    return (*shape[:-1], HALF)


def block_shape(shape: tuple[int, int], layout: str) -> tuple[int, ...]:
    """The shape ``(..., 32)`` the codes of an ``(out, in)`` weight held in ``layout``
    (:mod:`edgeadapt.format.layout`) pack from, its flat codes in blocks of 32: blocked32
    ``(out/32, in, 32)`` as it is, as-is ``(out, in/32, 32)`` (``in % 32 == 0``); ValueError
    for any other."""
    held = backend_shape(shape, layout)
    if layout == BLOCKED:
        return held
    if layout == AS_IS and held[1] % BLOCK == 0:
        return (held[0], held[1] // BLOCK, BLOCK)
    raise ValueError(f"int4 codes of {tuple(shape)} in the {layout} layout do not pack two per "
                     f"byte (blocked32, or as-is with in % {BLOCK} == 0)")


def pack(codes: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``P`` of int8 codes ``Q (..., 32)`` in [-8, 7] (module docstring); ValueError for a code
    outside the int4 range. ``out``: a uint8 array of the packed shape to write into."""
    q = np.asarray(codes)
    shape = packed_shape(q.shape)
    if q.size and (int(q.min()) < -OFFSET or int(q.max()) > OFFSET - 1):
        raise ValueError(f"int4 codes must lie in [-8, 7]; found {int(q.min())}..{int(q.max())}")
    n = (q.astype(np.int16) + OFFSET).astype(np.uint8)
    packed = n[..., :HALF] | (n[..., HALF:] << 4)
    if out is None:
        return packed
    if out.shape != shape or out.dtype != np.uint8:
        raise ValueError(f"packed buffer {out.shape} {out.dtype}, expected {shape} uint8")
    np.copyto(out, packed)
    return out


def unpack(packed: np.ndarray) -> np.ndarray:
    """int8 codes ``Q (..., 32)`` of a packed buffer ``P (..., 16)``."""
    p = np.asarray(packed, dtype=np.uint8)
    lo = (p & 0x0F).astype(np.int8) - OFFSET
    hi = (p >> 4).astype(np.int8) - OFFSET
    return np.concatenate([lo, hi], axis=-1).astype(np.int8)


def byte_of(pos: np.ndarray) -> np.ndarray:
    """The byte of the packed buffer (flat) holding the code at blocked32 flat index ``pos``."""
    pos = np.asarray(pos, dtype=np.int64)
    return (pos >> 5) * HALF + (pos & (HALF - 1))


def shift_of(pos: np.ndarray) -> np.ndarray:
    """Bits to shift that byte right to bring the code's nibble down: 0 or 4."""
    return ((np.asarray(pos, dtype=np.int64) >> 4) & 1) * 4


def gather(flat: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """int8 codes at blocked32 flat indices ``pos`` of a flat packed buffer."""
    b = flat[byte_of(pos)]
    return (((b >> shift_of(pos).astype(np.uint8)) & 0x0F).astype(np.int16) - OFFSET
            ).astype(np.int8)


def scatter(flat: np.ndarray, pos: np.ndarray, codes: np.ndarray) -> None:
    """Write int8 ``codes`` at blocked32 flat indices ``pos`` (distinct) of a flat packed
    buffer, each a read-modify-write of its byte ``b = byte_of(p)``, with ``n = q + 8``::

        P[b] = (P[b] & 0xF0) | n            p & 16 == 0   (low nibble)
        P[b] = (P[b] & 0x0F) | (n << 4)     p & 16 != 0   (high nibble)

    The low nibbles first, then the high ones, each one vectorised read-modify-write: within
    one half no two positions share a byte (``byte_of`` is one-to-one on it), and a byte that
    holds two of the codes gets its high one over the low one just written."""
    pos = np.asarray(pos, dtype=np.int64)
    byte = byte_of(pos)
    n = (np.asarray(codes).astype(np.int16) + OFFSET).astype(np.uint8)
    high = (pos & HALF).astype(bool)
    _write_half(flat, byte, n, np.flatnonzero(~high), high=False)
    _write_half(flat, byte, n, np.flatnonzero(high), high=True)


def _write_half(flat: np.ndarray, byte: np.ndarray, n: np.ndarray, idx: np.ndarray,
                high: bool) -> None:
    """``P[b] = (P[b] & keep) | (n << shift)`` for the entries ``idx`` of ``byte`` and ``n``,
    all low nibbles (``keep = 0xF0``, ``shift = 0``) or all high ones (``0x0F``, 4): one fancy
    read and one fancy write (their bytes are distinct)."""
    keep, shift = (np.uint8(0x0F), np.uint8(4)) if high else (np.uint8(0xF0), np.uint8(0))
    b = byte.take(idx)
    flat[b] = (flat.take(b) & keep) | (n.take(idx) << shift)
