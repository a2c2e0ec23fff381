"""Numeric codecs of the adapter file: SHiRA position gaps with escapes, and bf16 bit patterns.

Positions (docs/format.md §2): strictly increasing flat positions ``p`` become gaps
``d_k = p_k - p_{k-1} - 1`` (``p_{-1} = -1``); ``gaps = min(d, ESC)`` in a small unsigned type
whose largest value is the escape code ``ESC``; every ``d_k >= ESC`` goes, in order, into
``escapes``. Decoding is ``p = cumsum(d + 1) - 1``.
"""

from __future__ import annotations

import numpy as np

GAP_DTYPES = ("U8", "U16", "U32")
ESCAPE_DTYPES = ("U16", "U32", "U64")
_NP = {"U8": np.uint8, "U16": np.uint16, "U32": np.uint32, "U64": np.uint64}


def escape_code(gap_dtype: str) -> int:
    """The escape code of a gap dtype: its largest value."""
    return int(np.iinfo(_NP[gap_dtype]).max)


def encode_positions(indices: np.ndarray) -> tuple[str, np.ndarray, str, np.ndarray]:
    """Encode strictly increasing non-negative ``indices`` (K,) as ``(gap dtype, gaps,
    escape dtype, escapes)``, choosing the pair of dtypes with the fewest bytes."""
    p = np.asarray(indices, dtype=np.int64)
    d = np.diff(p, prepend=-1) - 1
    best = None
    for gdt in GAP_DTYPES:
        esc = escape_code(gdt)
        big = d[d >= esc]
        top = int(big.max()) if big.size else 0
        edt = next(e for e in ESCAPE_DTYPES if top <= np.iinfo(_NP[e]).max)
        nbytes = d.size * np.dtype(_NP[gdt]).itemsize + big.size * np.dtype(_NP[edt]).itemsize
        if best is None or nbytes < best[0]:
            gaps = np.minimum(d, esc).astype(_NP[gdt])
            best = (nbytes, gdt, gaps, edt, big.astype(_NP[edt]))
    _, gdt, gaps, edt, escapes = best
    return gdt, gaps, edt, escapes


def decode_positions(gaps: np.ndarray, gap_dtype: str, escapes: np.ndarray,
                     numel: int) -> np.ndarray:
    """Decode to int64 positions (K,); raise ValueError unless they are strictly increasing
    and all in ``[0, numel)``. ``numel`` must be below 2**62."""
    esc = escape_code(gap_dtype)
    d = gaps.astype(np.uint64)
    is_esc = gaps == esc
    n_esc = int(np.count_nonzero(is_esc))
    if n_esc != escapes.size:
        raise ValueError(f"{n_esc} escape codes but {escapes.size} escaped gaps")
    if escapes.size:
        if int(escapes.min()) < esc:
            raise ValueError(f"escaped gap {int(escapes.min())} below the escape code {esc}")
        if int(escapes.max()) >= numel:
            raise ValueError(f"gap {int(escapes.max())} exceeds the weight's {numel} elements")
        d[is_esc] = escapes.astype(np.uint64)
    if d.size == 0:
        return np.zeros(0, dtype=np.int64)
    # Every step d + 1 is in [1, numel] <= 2**62, so a wrap-around modulo 2**64 shows up as a
    # decrease: checking "strictly increasing and last < numel" after the uint64 sum is total.
    pos = np.cumsum(d + np.uint64(1), dtype=np.uint64) - np.uint64(1)
    if pos.size > 1 and not bool(np.all(pos[1:] > pos[:-1])):
        raise ValueError("positions overflow (not strictly increasing)")
    if int(pos[-1]) >= numel:
        raise ValueError(f"position {int(pos[-1])} out of range for {numel} elements")
    return pos.astype(np.int64)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest, ties to even) and return the uint16 bit patterns.
    Inputs must be finite (the writer checks)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bit patterns (uint16) to float32 exactly."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
