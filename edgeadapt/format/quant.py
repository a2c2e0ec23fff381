"""The quantization grids of quantized bundles: int8 and int4 in blocks of 32 input columns
(numpy only, torch-free; the one home of the code arithmetic).

A weight ``W (out, in)`` is held as integer codes ``q`` and float32 scales ``s``, one scale per
output row and *group* of ``G = 32`` consecutive input columns:

    W[r, c] ~= q[r, c] * s[r, c // G]            q in [qmin, qmax] = [-2^(b-1), 2^(b-1) - 1]
    q[r, c] = clip(round(W[r, c] * (1 / s[r, c // G])), qmin, qmax)
    s[r, g] = v / qmin,  v = the group's max if |max| > |min|, else its min (sign kept)

``round`` and the reciprocal are the quantizer's: ``floor(x + 2^(b-1) + 0.5) - 2^(b-1)`` in
float32 (the stored code is unsigned, ``q + 2^(b-1)``; ties go up), and ``W * (1 / s)``, not
``W / s`` (they differ in the last bit, which decides a tie).

This is ONNX Runtime's own symmetric block quantization (``MatMulNBits`` with ``is_symmetric``,
4 and 8 bits): the largest-magnitude value lands exactly on ``qmin``, so the whole code range is
used (a scale may be negative; where max and min have one magnitude, the min's wins and the max
clamps to ``qmax``). A test checks codes and scales against ONNX Runtime's quantizer,
so edgeadapt's live weights and the backend's stock quantized weights lie on one grid.

Why blocks for int8 too, not one scale per output channel: ONNX Runtime's per-channel int8
kernels (``quantize_dynamic``) also quantize each activation tensor to uint8 with one scale,
which on SmolLM2 cost 0.54 nats of Hamlet NLL (4.41 -> 4.95) where block-wise int8 weights with
``MatMulNBits`` cost none (docs/quantized.md); ``MatMulNBits`` takes blocks of 16-256 columns,
not a whole row. A group of zeros has no largest value: it gets the largest scale of its weight
instead (its codes are 0 either way, and an adapter that later writes into the group has a usable
step).

Codes are stored one per byte (int8) for both grids in a bundle, so the layouts of
:mod:`edgeadapt.format.layout` apply to codes unchanged; where edgeadapt's ONNX Runtime kernel
reads int4 codes, the runtime holds them two per byte (:mod:`edgeadapt.format.nibbles`), a
code's position unchanged. Scales are stored as an ``(out, in // G)`` float32 matrix (in a
backend's layout like a weight of that shape).

Adding a delta to quantized entries (a fused SHiRA switch, :func:`requantize`) keeps the base's
scales: ``q' = clip(round((q * s + delta) * (1 / s)), qmin, qmax)``; entries that needed a code
outside the range are *saturated* and reported, never hidden.

**Affine grids** (``int4-affine``; a causal LM's head on int8, :data:`INT4_AFFINE`): a float
offset ``o`` per block besides the scale, GGUF Q4_1's grid. :func:`affine_split` takes each
block's minimum ``lo`` and maximum ``hi``:

    s_a = (hi - lo) / (qmax - qmin),   o = lo - qmin * s_a,   W' = W - o[r, c // G]

so ``W'`` spans ``[qmin s_a, qmax s_a]`` and the symmetric grid above holds it with scale
``s_a`` (its largest magnitude is ``qmin s_a``): ``W ~= q * s + o``. Nothing downstream of the
split changes: the codes and scales are the symmetric grid's, of ``W'``, and the offset term
``x @ O^T`` (``O`` the offsets repeated over their blocks) is a constant float computation
beside the quantized product, which a switch never touches (a delta added to ``W`` is the same
delta added to ``W'``). A weight that came from a Q4_1 model (16 values ``lo + j s_a`` per
block) is held exactly, up to float32 rounding; on SmolLM2 (a Q4_1 source) the symmetric int4
grid costs 0.27 nats of Hamlet NLL and the affine one none (docs/quantized.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeadapt.errors import ConfigError


@dataclass(frozen=True)
class Grid:
    """One quantization grid: ``bits`` per code, ``group`` input columns per scale; ``affine``:
    the codes hold ``W'``, beside an offset per block (module docstring); ``head``: the grid
    of a causal LM's head if it is not this one."""

    name: str
    bits: int
    group: int
    affine: bool = False
    #: the grid a causal LM's head goes on, where not this one (:data:`INT4_AFFINE`)
    head: str | None = None
    #: the grid the live weights go on, where not this one (:data:`INT4_AFFINE_LIVE8`)
    live: str | None = None

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def group_size(self, in_features: int) -> int:
        """``G`` for a weight with ``in_features`` columns; ConfigError if it does not divide."""
        g = self.group
        if in_features % g:
            raise ConfigError(f"{self.name} needs in_features % {g} == 0; the weight has "
                              f"{in_features} columns")
        return g

    def scales_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        """Shape of the scales of an ``(out, in)`` weight: ``(out, in // G)``."""
        out, inp = int(shape[0]), int(shape[1])
        return (out, inp // self.group_size(inp))

    def scales(self, weight: np.ndarray) -> np.ndarray:
        """float32 ``(out, in // G)`` scales of ``weight (out, in)`` (module docstring)."""
        w = np.asarray(weight, dtype=np.float32)
        out, inp = w.shape
        groups = w.reshape(out, -1, self.group_size(inp))
        lo, hi = groups.min(axis=-1), groups.max(axis=-1)
        s = np.where(np.abs(hi) > np.abs(lo), hi, lo) / np.float32(self.qmin)
        s = s.astype(np.float32)
        zero = s == 0
        if zero.any():
            s[zero] = np.abs(s).max() if (~zero).any() else np.float32(1.0)
        return s

    def scale_of(self, scales: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """The scale of every entry: ``(out, in)`` float32 (``s[r, c // G]``)."""
        return np.repeat(np.asarray(scales, np.float32), self.group_size(shape[1]), axis=1)

    def scale_at(self, scales: np.ndarray, shape: tuple[int, int], idx: np.ndarray
                 ) -> np.ndarray:
        """Scales of the entries at torch flat indices ``idx`` (``r * in + c``)."""
        inp = int(shape[1])
        idx = np.asarray(idx, dtype=np.int64)
        return np.asarray(scales, np.float32)[idx // inp, (idx % inp) // self.group_size(inp)]

    def round(self, x: np.ndarray) -> np.ndarray:
        """Codes for float32 ``x`` (values over their scales), clipped: ONNX Runtime's rounding
        (module docstring). int64."""
        off = np.float32(-self.qmin)
        u = np.floor(np.asarray(x, np.float32) + off + np.float32(0.5))
        return np.clip(u, 0, self.qmax - self.qmin).astype(np.int64) - int(off)

    def quantize(self, weight: np.ndarray, scales: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
        """``(codes int8 (out, in), scales float32 (out, in // G))`` of ``weight``; with
        ``scales`` given, on that grid (codes clipped to the range)."""
        w = np.asarray(weight, dtype=np.float32)
        s = self.scales(w) if scales is None else np.asarray(scales, np.float32)
        inverse = np.float32(1) / self.scale_of(s, w.shape)  # ONNX Runtime multiplies by 1/s
        return self.round(w * inverse).astype(np.int8), s

    def dequantize(self, codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
        """float32 ``(out, in)``: ``q * s``."""
        q = np.asarray(codes)
        return q.astype(np.float32) * self.scale_of(scales, q.shape)

    def requantize(self, codes: np.ndarray, scales: np.ndarray, delta: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
        """New codes for entries with ``codes`` and per-entry ``scales`` after adding
        ``delta`` (all 1-D, same length): ``clip(round((q s + delta) (1 / s)), qmin, qmax)``, and
        the boolean mask of the entries that saturated (needed a code outside the range)."""
        s = np.asarray(scales, np.float32)
        x = (np.asarray(codes).astype(np.float32) * s + np.asarray(delta, np.float32)) \
            * (np.float32(1) / s)
        saturated = (x < self.qmin - 0.5) | (x >= self.qmax + 0.5)
        return self.round(x).astype(np.int8), saturated

    def check_scales(self, scales: np.ndarray, shape: tuple[int, int], where: str) -> None:
        """ConfigError unless ``scales`` has the grid's shape for ``shape`` and every scale is
        finite and non-zero (a zero scale cannot hold any edit; NaN poisons every output)."""
        want = self.scales_shape(shape)
        s = np.asarray(scales)
        if tuple(s.shape) != want:
            raise ConfigError(f"{where}: {self.name} scales have shape {tuple(s.shape)}, "
                              f"expected {want}")
        bad = ~np.isfinite(s) | (s == 0)
        if bad.any():
            raise ConfigError(f"{where}: {int(bad.sum())} {self.name} scales are zero or not "
                              "finite")


INT8 = Grid("int8", 8, 32)
INT4 = Grid("int4", 4, 32)
#: int4 codes beside a float offset per block (module docstring, "Affine grids"); a causal
#: LM's head on int8: SmolLM2's Q4_1 GGUF kept its embedding (the tied head) at more bits,
#: 29 distinct values per block of 32 (median), and int4 there cost 0.043 nats of Hamlet NLL
#: where int8 costs none (llama.cpp's 4-bit mixes keep the output matrix at 6 bits or more)
INT4_AFFINE = Grid("int4-affine", 4, 32, affine=True, head="int8")
#: int4-affine with the live weights (the ones a SHiRA adapter edits, e.g. q and v) on int8:
#: an int4 step is coarse against what SHiRA moves an entry by in training (SmolLM2 Hamlet,
#: quantization-aware SHiRA +13% perplexity over fp32 SHiRA on int4-affine, level with it on
#: this mix; docs/results.md), and the live weights are a small part of the blocks (q and v:
#: 12.5% of SmolLM2's), as llama.cpp's mixes keep chosen tensors at more bits
INT4_AFFINE_LIVE8 = Grid("int4-affine-live8", 4, 32, affine=True, head="int8", live="int8")
GRIDS = {g.name: g for g in (INT8, INT4, INT4_AFFINE, INT4_AFFINE_LIVE8)}
#: the ``--weights`` choices: fp32 (no grid) and the grids
PRECISIONS = ("fp32", *GRIDS)


def grid(name: str) -> Grid:
    """The grid named ``name`` (a key of :data:`GRIDS`); ConfigError otherwise."""
    if name not in GRIDS:
        raise ConfigError(f"unknown weight precision {name!r}: choose one of {PRECISIONS}")
    return GRIDS[name]


def live_grid(precision: str) -> Grid:
    """The grid a ``precision`` bundle's live weights (its ``--targets``, which adapters edit)
    go on: ``Grid.live`` where the precision names one, else the precision's own grid."""
    g = grid(precision)
    return grid(g.live) if g.live else g


def affine_split(weight: np.ndarray, g: Grid) -> tuple[np.ndarray, np.ndarray]:
    """``(W', o)`` of ``weight (out, in)`` (module docstring): ``W' = W - o[r, c // G]``
    float32 ``(out, in)``, to be quantized on ``g``'s symmetric codes, and the offsets ``o``
    float32 ``(out, in // G)``."""
    w = np.asarray(weight, dtype=np.float32)
    out, inp = w.shape
    blocks = w.reshape(out, -1, g.group_size(inp))
    lo, hi = blocks.min(axis=-1), blocks.max(axis=-1)
    step = (hi - lo) / np.float32(g.qmax - g.qmin)
    offsets = (lo - np.float32(g.qmin) * step).astype(np.float32)
    return (blocks - offsets[..., None]).reshape(out, inp).astype(np.float32), offsets


def offset_weight(offsets: np.ndarray, g: Grid, shape: tuple[int, int]) -> np.ndarray:
    """``O``: the offsets repeated over their blocks, float32 ``(out, in)``."""
    return g.scale_of(offsets, shape)


def codes_weight(weight: np.ndarray, g: Grid) -> np.ndarray:
    """What a bundle on grid ``g`` quantizes of ``weight``: ``W'`` on an affine grid
    (:func:`affine_split`), else ``weight`` itself."""
    return affine_split(weight, g)[0] if g.affine else weight
