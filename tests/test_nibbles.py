"""int4 codes packed two per byte (edgeadapt/format/nibbles.py) and the switch's nibble scatter
(runtime/scatter.py, kernels/scatter.cpp), against hand-computed bytes and plain int8 code
arrays. Torch-free."""

from __future__ import annotations

import numpy as np
import pytest

from edgeadapt.format import nibbles
from edgeadapt.runtime.scatter import native_scatter, scatter_nibbles


def test_pack_lays_out_columns_j_and_j_plus_16_as_offset_binary():
    q = np.zeros((1, 2, 32), np.int8)
    q[0, 0, 0], q[0, 0, 16] = -8, 7     # byte 0: low nibble 0, high nibble 15
    q[0, 1, 3], q[0, 1, 19] = 1, -1     # byte 16 + 3: low 9, high 7
    p = nibbles.pack(q)
    assert p.shape == (1, 2, 16) and p.dtype == np.uint8
    assert p[0, 0, 0] == 0xF0
    assert p[0, 1, 3] == (9 | 7 << 4)
    assert p[0, 0, 1] == (8 | 8 << 4)   # code 0 is nibble 8
    np.testing.assert_array_equal(nibbles.unpack(p), q)


def test_positions_map_to_bytes_and_nibbles():
    pos = np.array([0, 15, 16, 31, 32, 47, 48, 64 * 32 + 17])
    np.testing.assert_array_equal(nibbles.byte_of(pos), [0, 15, 0, 15, 16, 31, 16, 64 * 16 + 1])
    np.testing.assert_array_equal(nibbles.shift_of(pos), [0, 0, 4, 4, 0, 0, 4, 4])


def test_pack_refuses_codes_outside_int4_and_unblocked_shapes():
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        nibbles.pack(np.full((1, 1, 32), 8, np.int8))
    with pytest.raises(ValueError, match="blocked32"):
        nibbles.pack(np.zeros((2, 16), np.int8))


@pytest.mark.parametrize("native", [True, False])
def test_gather_and_scatter_equal_the_unpacked_codes(native):
    if native and not native_scatter():
        pytest.skip("no C++ compiler: the native scatter is not built")
    rng = np.random.default_rng(3)
    q = rng.integers(-8, 8, (6, 40, 32)).astype(np.int8)
    flat = nibbles.pack(q).reshape(-1)
    # every pair of codes sharing a byte among the positions, and lone ones
    pos = np.unique(np.concatenate([rng.choice(q.size, 2000, replace=False),
                                    [0, 16, 31, 15, q.size - 1]])).astype(np.int64)
    np.testing.assert_array_equal(nibbles.gather(flat, pos), q.reshape(-1)[pos])
    new = rng.integers(-8, 8, pos.size).astype(np.int8)
    scatter_nibbles(flat, pos, new, native=native)
    want = q.reshape(-1).copy()
    want[pos] = new
    np.testing.assert_array_equal(nibbles.unpack(flat.reshape(6, 40, 16)).reshape(-1), want)


@pytest.mark.parametrize("native", [True, False])
def test_scatter_outside_the_buffer_writes_nothing(native):
    flat = nibbles.pack(np.zeros((1, 4, 32), np.int8)).reshape(-1)
    before = flat.copy()
    with pytest.raises(IndexError, match="outside"):
        scatter_nibbles(flat, np.array([3, 4 * 32], np.int64), np.array([1, 1], np.int8),
                        native=native)
    np.testing.assert_array_equal(flat, before)


def _scatter_per_code(flat: np.ndarray, pos: np.ndarray, codes: np.ndarray) -> None:
    """The reference: one read-modify-write of a byte per code, in order, in plain Python."""
    for p, q in zip(pos.tolist(), codes.tolist(), strict=True):
        b, high = (p >> 5) * 16 + (p & 15), bool(p & 16)
        n = q + 8
        flat[b] = (int(flat[b]) & 0x0F) | (n << 4) if high else (int(flat[b]) & 0xF0) | n


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_numpy_scatter_equals_a_per_code_reference_and_the_native_one(seed):
    """Dense random positions (most bytes get both nibbles in one call), a whole block, and a
    byte written only in its high nibble beside one written only in its low."""
    rng = np.random.default_rng(seed)
    flat = rng.integers(0, 256, 5 * 7 * 16, dtype=np.uint8)
    pos = np.unique(np.concatenate([rng.choice(2 * flat.size, 700, replace=False),
                                    np.arange(64, 96), [16 * 32 + 20, 16 * 32 + 5]]))
    pos = pos.astype(np.int64)
    codes = rng.integers(-8, 8, pos.size).astype(np.int8)
    assert np.intersect1d(nibbles.byte_of(pos[nibbles.shift_of(pos) == 0]),
                          nibbles.byte_of(pos[nibbles.shift_of(pos) == 4])).size > 100
    want = flat.copy()
    _scatter_per_code(want, pos, codes)
    got = flat.copy()
    nibbles.scatter(got, pos, codes)
    np.testing.assert_array_equal(got, want)
    if native_scatter():
        native = flat.copy()
        scatter_nibbles(native, pos, codes, native=True)
        np.testing.assert_array_equal(native, want)


def test_block_shape_of_each_layout():
    assert nibbles.block_shape((64, 96), "blocked32") == (2, 96, 32)
    assert nibbles.block_shape((21, 96), "as-is") == (21, 3, 32)
    with pytest.raises(ValueError, match="do not pack"):
        nibbles.block_shape((21, 40), "as-is")
    with pytest.raises(ValueError, match="do not pack"):
        nibbles.block_shape((64, 96), "transposed")


@pytest.mark.parametrize("layout,shape", [("as-is", (21, 96)), ("blocked32", (64, 96))])
def test_a_packed_live_weight_answers_as_its_unpacked_twin(layout, shape):
    """A :class:`LiveWeight` of int4 codes packed two per byte in the as-is layout (ExecuTorch's
    ``(out, in/32, 16)``) or blocked32 (ONNX Runtime's) reads, writes, gathers and scatters
    codes at the layout's positions as the same weight a code per byte does."""
    from edgeadapt.format.layout import to_backend
    from edgeadapt.format.quant import INT4
    from edgeadapt.runtime.store import Codes, LiveWeight

    rng = np.random.default_rng(5)
    q, s = INT4.quantize(rng.standard_normal(shape).astype(np.float32))
    held = to_backend(q, layout)
    one = LiveWeight("w", held.copy(), layout, shape, codes=Codes(INT4, s))
    two = LiveWeight("w", nibbles.pack(held.reshape(nibbles.block_shape(shape, layout))),
                     layout, shape, codes=Codes(INT4, s), packed=True)
    assert two.array.shape == nibbles.packed_shape(nibbles.block_shape(shape, layout))
    assert two.dtype == np.int8 and two.array.nbytes * 2 == q.size
    np.testing.assert_array_equal(two.torch_weight(), q)
    np.testing.assert_array_equal(two.read(), one.read())
    np.testing.assert_array_equal(two.dequantized(), one.dequantized())
    pos = np.unique(rng.choice(q.size, 300, replace=False)).astype(np.int64)
    np.testing.assert_array_equal(two.gather(pos), one.gather(pos))
    new = rng.integers(-8, 8, pos.size).astype(np.int8)
    for lw in (one, two):
        lw.scatter(pos, new)
    np.testing.assert_array_equal(two.read(), one.read())
    full = to_backend(rng.integers(-8, 8, shape).astype(np.int8), layout)
    for lw in (one, two):
        lw.write(full)
    np.testing.assert_array_equal(two.torch_weight(), one.torch_weight())
    with pytest.raises(ValueError, match="no \\(out, in\\) view"):
        two.torch_view()
    with pytest.raises(ValueError, match="only int4"):
        LiveWeight("w", held.astype(np.uint8), layout, shape, packed=True)
