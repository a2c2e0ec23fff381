"""edgeadapt's int4 ONNX Runtime kernel, ``edgeadapt.Q4BlockedMatMul``
(kernels/blocked_matmul.cpp): int4 codes packed two per byte in the blocked32 layout
(:mod:`edgeadapt.format.nibbles`) with a scale per row and group of columns, against float64
numpy on the dequantized weight and against the int8 form ``edgeadapt.QBlockedMatMul`` on the
unpacked codes, on the vector and the portable path; an in-place edit of the packed codes seen
by the next run; packed codes of the wrong shape or type refused. With int8 activations
(``accuracy_level`` 4, :func:`int8_want`): against float64 numpy on MLAS's quantization of x
and integer sums, against ONNX Runtime's own MatMulNBits at level 4 on the same codes, one
token's rows equal to a prefill's, and the same bits on the VNNI, the AVX-512 and the portable
path. Torch-free."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper
from test_onnxruntime_kernel import op_session

from edgeadapt.format import nibbles
from edgeadapt.format.layout import BLOCKED, to_backend, to_torch
from edgeadapt.format.quant import INT4, INT4_AFFINE, Grid, affine_split
from edgeadapt.graphs.blocked import Q4KERNEL_OP, QKERNEL_OP
from edgeadapt.runtime.backends.onnxruntime import kernel as ok

ort = pytest.importorskip("onnxruntime")
REASON = ok.unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"kernel unavailable: {REASON}")


def _session(k: int, rank: int, threads: int = 1, library: Path | None = None,
             op: str = Q4KERNEL_OP, codes: list | None = None, level: int | None = None):
    """One ``y = op(x, p, s)`` node: the int4 op on packed codes ``p`` (uint8), or with
    ``op=QKERNEL_OP`` the int8 op on one code a byte (int8); ``level``: its
    ``accuracy_level`` (None: none, the op's default 0)."""
    dims = [f"d{i}" for i in range(rank - 1)] + [k]
    int4 = op == Q4KERNEL_OP
    return op_session(op, [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, dims),
        helper.make_tensor_value_info("p", TensorProto.UINT8 if int4 else TensorProto.INT8,
                                      codes or ["nb", k, 16 if int4 else 32]),
        helper.make_tensor_value_info("s", TensorProto.FLOAT, ["nb", "g", 32])],
        threads, library, **({} if level is None else {"accuracy_level": level}))


def pairs_session(op: str, k: int, pairs: list[tuple[np.ndarray, np.ndarray]], level: int,
                  threads: int = 1, library: Path | None = None):
    """One ``y_1, ..., y_n = op(x, p_1, s_1, ..., p_n, s_n)`` node at ``accuracy_level``
    ``level``, x ``(..., k)``; feed ``x`` and ``p<i>``, ``s<i>``."""
    code_type = TensorProto.UINT8 if op == Q4KERNEL_OP else TensorProto.INT8
    ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["d0", "d1", k][-2:])]
    for i, (p, s) in enumerate(pairs):
        ins += [helper.make_tensor_value_info(f"p{i}", code_type, list(p.shape)),
                helper.make_tensor_value_info(f"s{i}", TensorProto.FLOAT, list(s.shape))]
    return op_session(op, ins, threads, library, tuple(f"y{i}" for i in range(len(pairs))),
                      accuracy_level=level)


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x ``(..., K)`` quantized per row in blocks of 32 columns as ONNX Runtime's MatMulNBits
    quantizes its activations at accuracy level 4 (MLAS, each step in float32: ``m = max |x|``,
    ``rint(x * (127 / m))``, ties to even; ``a = m / 127``; ``m = 0``: all 0): the int8 values
    ``(..., K/32 rounded up, 32)`` (zeros past K) as int64 and the scales ``(..., blocks)``."""
    k = x.shape[-1]
    nb = -(-k // 32)
    b = np.zeros((*x.shape[:-1], nb * 32), np.float32)
    b[..., :k] = x
    b = b.reshape(*x.shape[:-1], nb, 32)
    m = np.abs(b).max(-1)
    inv = np.where(m > 0, np.float32(127) / np.where(m > 0, m, np.float32(1)), np.float32(0))
    xq = np.rint(b * inv[..., None].astype(np.float32))
    assert xq.dtype == np.float32 and np.abs(xq).max(initial=0) <= 127
    return xq.astype(np.int64), (m / np.float32(127)).astype(np.float32)


def int8_want(x: np.ndarray, q: np.ndarray, s: np.ndarray) -> np.ndarray:
    """float64 ``y (..., N)`` of the op at ``accuracy_level`` 4 on codes ``q (N, K)`` (integers)
    and scales ``s (N, K/G)``: ``sum_blk a_blk s[:, g(blk)] (xq_blk . q_blk)``, the dot products
    exact integers, where each group is whole blocks of 32 (G a multiple of 32); otherwise
    ``(xq a) @ (q s).T`` (the op's float path on the dequantized x)."""
    xq, a = quantize_rows(x)
    n, k = q.shape
    g = k // s.shape[1]
    if k % 32 == 0 and g % 32 == 0:
        dots = np.einsum("...bc,nbc->...nb", xq, q.astype(np.int64).reshape(n, k // 32, 32))
        sb = s[:, np.arange(k // 32) * 32 // g].astype(np.float64)
        return (dots * a[..., None, :].astype(np.float64) * sb).sum(-1)
    xd = (xq * a[..., None].astype(np.float64)).reshape(*x.shape[:-1], -1)[..., :k]
    return xd @ (q.astype(np.float64) * np.repeat(s.astype(np.float64), g, axis=1)).T


def _grid_codes(grid: Grid, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                     np.ndarray]:
    """(packed codes, blocked scales, codes (out, in), scales (out, in/G)) of ``w`` (of
    ``W'`` on an affine grid, as :func:`_buffers`)."""
    if grid.affine:
        w = affine_split(w, grid)[0]
    q, s = grid.quantize(w)
    return nibbles.pack(to_backend(q, BLOCKED)), to_backend(s, BLOCKED), q, s


def _buffers(grid: Grid, w: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(packed codes, scales, int8 codes) in the backend layout, and the dequantized weight
    (out, in) the op computes with: on an affine grid the codes of ``W'`` (the offset term is
    a float computation beside the op: edgeadapt.format.quant)."""
    if grid.affine:
        w = affine_split(w, grid)[0]
    q, s = grid.quantize(w)
    qb = to_backend(q, BLOCKED)
    return nibbles.pack(qb), to_backend(s, BLOCKED), qb, grid.dequantize(q, s)


def _want(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return x.astype(np.float64) @ w.T.astype(np.float64)


#: one scale per row (one group of K = 45 columns: the odd, unrolled-remainder path)
ROW45 = Grid("int4-row", 4, 45)
GRIDS = [(ROW45, 45), (INT4, 96), (INT4_AFFINE, 96), (INT4, 32)]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("grid,k", GRIDS)
@pytest.mark.parametrize("lead", [(1,), (5,), (13,), (2, 48), (97,), (0,)])
def test_op_matches_numpy(grid, k, lead, threads):
    """Row counts across the tile and the chunk, K not a multiple of the unroll (one group
    per row), one and several groups, the symmetric and the affine grid's codes."""
    rng = np.random.default_rng(k * 10 + lead[-1])
    n = 64
    p, s, _, wq = _buffers(grid, rng.standard_normal((n, k)).astype(np.float32))
    x = rng.standard_normal((*lead, k)).astype(np.float32)
    y = _session(k, len(lead) + 1, threads).run(None, {"x": x, "p": p, "s": s})[0]
    assert y.shape == (*lead, n)
    np.testing.assert_allclose(y, _want(x, wq), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("level", [0, 4])
@pytest.mark.parametrize("grid,k", GRIDS)
@pytest.mark.parametrize("lead", [(1,), (13,), (97,)])
def test_op_equals_the_int8_op_on_the_unpacked_codes(grid, k, lead, level):
    """The same float codes multiplied in the same order (level 4, one token: the same
    integers and float operations): the same bits as QBlockedMatMul."""
    rng = np.random.default_rng(k + lead[-1])
    p, s, q, _ = _buffers(grid, rng.standard_normal((96, k)).astype(np.float32))
    np.testing.assert_array_equal(nibbles.unpack(p), q)
    x = rng.standard_normal((*lead, k)).astype(np.float32)
    y4 = _session(k, 2, 2, level=level).run(None, {"x": x, "p": p, "s": s})[0]
    y8 = _session(k, 2, 2, op=QKERNEL_OP, level=level).run(None, {"x": x, "p": q, "s": s})[0]
    np.testing.assert_array_equal(y4, y8)


def test_portable_path_matches_numpy(tmp_path, monkeypatch):
    """The plain C++ loops (built with -mno-avx512f, a library of its own), against numpy and
    against the portable int8 op."""
    monkeypatch.setenv("EDGEADAPT_CACHE", str(tmp_path))
    portable = ok.library_path(("-mno-avx512f",))
    assert portable != ok.library_path()
    rng = np.random.default_rng(5)
    for grid, k in ((ROW45, 45), (INT4, 64), (INT4_AFFINE, 64)):
        p, s, q, wq = _buffers(grid, rng.standard_normal((32, k)).astype(np.float32))
        for lead in ((1,), (13,)):
            x = rng.standard_normal((*lead, k)).astype(np.float32)
            y = _session(k, 2, library=portable).run(None, {"x": x, "p": p, "s": s})[0]
            np.testing.assert_allclose(y, _want(x, wq), rtol=1e-5, atol=1e-4)
            y8 = _session(k, 2, library=portable, op=QKERNEL_OP).run(
                None, {"x": x, "p": q, "s": s})[0]
            np.testing.assert_array_equal(y, y8)


#: one scale per row of 96 columns: a group of three blocks of x
ROW96 = Grid("int4-row96", 4, 96)
#: (grid, K, N of each pair): one block, several, groups of several blocks, K not a multiple
#: of 32 (the float path on the dequantized x, the last block of x short)
LEVEL4 = [(INT4, 32, (32,)), (INT4, 160, (96, 32, 64)), (INT4_AFFINE, 96, (64, 32)),
          (ROW96, 96, (32, 96)), (ROW45, 45, (32, 64))]


#: the int8 path's builds beside the loaded one (AVX512-VNNI and VBMI where the CPU has them):
#: VNNI without VBMI (vpermd + vpshufb for vpermb), neither (vpmaddubsw for vpdpbusd; int8
#: codes in plain C++), plain C++
PATH_FLAGS = (("-mno-avx512vbmi",), ("-mno-avx512vnni", "-mno-avx512vbmi"), ("-mno-avx512f",))


def path_libraries(tmp_path_factory) -> list[Path | None]:
    """The op's library as loaded (None) and built with each of ``PATH_FLAGS``, each a library
    of its own in this test session's cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEADAPT_CACHE", str(tmp_path_factory.getbasetemp() / "kernels"))
        return [None, *(ok.library_path(f) for f in PATH_FLAGS)]


@pytest.fixture(scope="module")
def libraries(tmp_path_factory) -> list[Path | None]:
    return path_libraries(tmp_path_factory)


def _x(rng, lead: tuple[int, ...], k: int) -> np.ndarray:
    """Random rows with zero blocks of 32 (amax 0): the first block of row 0 and, in a
    second row, all of it."""
    x = rng.standard_normal((*lead, k)).astype(np.float32)
    x.reshape(-1, k)[0, :32] = 0
    if x.size > k:
        x.reshape(-1, k)[1] = 0
    return x


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("grid,k,ns", LEVEL4)
@pytest.mark.parametrize("lead", [(1,), (5,), (2, 13)])
def test_int8_activations_match_numpy(grid, k, ns, lead, threads):
    """accuracy_level 4, several pairs in one node: float64 numpy on x quantized as MLAS
    quantizes it and integer sums (rounding only: a step of one activation would be ~1e-3);
    every row of a prefill equal to that row alone (the one-token path): bit for bit where the
    groups are whole blocks of x (the same integers and float operations), else to rounding."""
    rng = np.random.default_rng(k + len(ns) + lead[-1])
    made = [_grid_codes(grid, rng.standard_normal((n, k)).astype(np.float32)) for n in ns]
    x = _x(rng, lead, k)
    feeds = {"x": x.reshape(-1, k), **{f"p{i}": m[0] for i, m in enumerate(made)},
             **{f"s{i}": m[1] for i, m in enumerate(made)}}
    sess = pairs_session(Q4KERNEL_OP, k, [m[:2] for m in made], 4, threads)
    ys = sess.run(None, feeds)
    for y, (_, _, q, s) in zip(ys, made, strict=True):
        want = int8_want(x.reshape(-1, k), q, s)
        assert y.shape == want.shape
        np.testing.assert_allclose(y, want, rtol=0, atol=2e-6 * np.abs(want).max())
    whole = k % 32 == 0 and grid.group % 32 == 0
    for r in range(x.reshape(-1, k).shape[0]):
        one = sess.run(None, {**feeds, "x": x.reshape(-1, k)[r:r + 1]})
        for y, y1 in zip(ys, one, strict=True):
            if whole:
                np.testing.assert_array_equal(y1[0], y[r])
            else:
                np.testing.assert_allclose(y1[0], y[r], rtol=0, atol=1e-6 * np.abs(y).max())


def test_int8_activations_are_the_same_bits_on_every_path(libraries):
    """Level 4 with groups of whole blocks of x, one token or 13: the same integers and float
    operations on every path (``PATH_FLAGS``): the same bits. K = 45 (the float paths on the
    dequantized x): numpy's values on each."""
    rng = np.random.default_rng(3)
    for grid, k, ns in LEVEL4:
        made = [_grid_codes(grid, rng.standard_normal((n, k)).astype(np.float32)) for n in ns]
        feeds = {**{f"p{i}": m[0] for i, m in enumerate(made)},
                 **{f"s{i}": m[1] for i, m in enumerate(made)}}
        for rows in (1, 13):
            x = _x(rng, (rows,), k)
            ys = [pairs_session(Q4KERNEL_OP, k, [m[:2] for m in made], 4, library=lib).run(
                None, {**feeds, "x": x}) for lib in libraries]
            for y, (_, _, q, s) in zip(ys[0], made, strict=True):
                want = int8_want(x, q, s)
                np.testing.assert_allclose(y, want, rtol=0, atol=2e-6 * np.abs(want).max())
            for other in ys[1:]:
                for y, y2 in zip(ys[0], other, strict=True):
                    if k % 32 == 0 and grid.group % 32 == 0:
                        np.testing.assert_array_equal(y2, y)
                    else:
                        np.testing.assert_allclose(y2, y, rtol=0, atol=1e-6 * np.abs(y).max())


def test_accuracy_levels_other_than_0_and_4_are_refused():
    with pytest.raises(Exception, match="accuracy_level must be 0 .* or 4"):
        _session(64, 2, level=2)
    with pytest.raises(Exception, match="float weights take no accuracy_level"):
        op_session("BlockedMatMul", [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", 64]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [1, 64, 32])],
            accuracy_level=4)


@pytest.mark.parametrize("level", [0, 4])
@pytest.mark.parametrize("rows", [1, 13])
def test_packed_codes_edited_in_place_are_read(rows, level):
    """Bound once (as the live store binds), one byte (two codes) edited in place: the next
    run follows the codes (a packed copy would not)."""
    rng = np.random.default_rng(1)
    k, n = 64, 32
    p, s, _, _ = _buffers(INT4, rng.standard_normal((n, k)).astype(np.float32))
    sess = _session(k, 2, level=level)
    binding = sess.io_binding()
    binding.bind_ortvalue_input("p", ort.OrtValue.ortvalue_from_numpy(p))
    binding.bind_ortvalue_input("s", ort.OrtValue.ortvalue_from_numpy(s))
    x = rng.standard_normal((rows, k)).astype(np.float32)
    outs = []
    for _ in range(2):
        binding.bind_cpu_input("x", x)
        binding.bind_output("y", "cpu")
        sess.run_with_iobinding(binding)
        outs.append(binding.get_outputs()[0].numpy())
        q = to_torch(nibbles.unpack(p), (n, k), BLOCKED)
        ts = to_torch(s, (n, k // 32), BLOCKED)
        want = int8_want(x, q, ts) if level else _want(x, INT4.dequantize(q, ts))
        np.testing.assert_allclose(outs[-1], want, rtol=1e-5, atol=1e-4)
        p[0, 3, 5] ^= 0xFF  # codes (column 3) of output rows 5 and 21: q -> -1 - q, both
    assert not np.allclose(outs[0][:, [5, 21]], outs[1][:, [5, 21]])
    np.testing.assert_array_equal(np.delete(outs[0], [5, 21], 1), np.delete(outs[1], [5, 21], 1))


def test_op_refuses_packed_codes_that_do_not_fit():
    sess = _session(64, 2, codes=["a", "b", "c"])  # the graph lets any shape through
    x, s = np.ones((1, 64), np.float32), np.ones((1, 2, 32), np.float32)
    for p in (np.zeros((1, 64, 32), np.uint8),  # one code a byte: the int8 op's layout
              np.zeros((1, 32, 16), np.uint8)):  # K not x's
        with pytest.raises(Exception, match="Q4BlockedMatMul: need x .* same K"):
            sess.run(None, {"x": x, "p": p, "s": s})
    with pytest.raises(Exception, match="uint8"):  # int8 codes: ORT checks the input's type
        sess.run(None, {"x": x, "p": np.zeros((1, 64, 16), np.int8), "s": s})
    p = np.zeros((1, 64, 16), np.uint8)
    for s in (np.ones((1, 3, 32), np.float32), np.ones((2, 1, 32), np.float32)):
        with pytest.raises(Exception, match="Q4BlockedMatMul: need scales"):
            sess.run(None, {"x": x, "p": p, "s": s})


def _stock_nbits(b: np.ndarray, scales: np.ndarray, n: int, k: int, level: int,
                 x: np.ndarray) -> np.ndarray:
    """ONNX Runtime's own int4 ``MatMulNBits`` (blocks of 32, no zero points) at
    ``accuracy_level`` ``level`` on ``x``."""
    from onnx import numpy_helper

    node = helper.make_node("MatMulNBits", ["x", "B", "S"], ["y"], domain="com.microsoft",
                            K=k, N=n, bits=4, block_size=32, accuracy_level=level)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(b, "B"), numpy_helper.from_array(scales, "S")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    return ort.InferenceSession(model.SerializeToString(),
                                providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("level", [0, 4])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("n,k", [(64, 96), (160, 576)])
def test_pairs_and_an_absorbed_matmulnbits_match_stock_onnxruntime(n, k, rows, level):
    """kernel_quantized_matmuls-style merge, checked op by op: a constant symmetric int4
    ``MatMulNBits`` (ONNX Runtime's layout: code k of a block in byte k // 2, low nibble first,
    offset 8) re-laid by ``_int4_constant`` and read by one ``Q4BlockedMatMul`` beside a live
    pair equals ONNX Runtime's own MatMulNBits at the same accuracy level (0: float
    activations; 4: int8 per block of 32, x with a zero block) to 1e-5 of its largest output,
    and float64 numpy (:func:`_want`, :func:`int8_want`); an asymmetric one (zero points) is
    left alone."""
    from onnx import numpy_helper

    from edgeadapt.graphs.quantized import _int4_constant

    rng = np.random.default_rng(11)
    bs = 32
    u = rng.integers(0, 16, size=(n, k)).astype(np.uint8)  # MatMulNBits' offset codes
    b = (u[:, 0::2] | (u[:, 1::2] << 4)).reshape(n, k // bs, bs // 2)
    scales = rng.uniform(0.01, 0.1, size=(n, k // bs)).astype(np.float32)
    inits = {"B": numpy_helper.from_array(b, "B"), "S": numpy_helper.from_array(scales, "S")}
    nbits = helper.make_node("MatMulNBits", ["x", "B", "S"], ["y"], domain="com.microsoft",
                             K=k, N=n, bits=4, block_size=bs, accuracy_level=level)
    p, s = _int4_constant(nbits, inits, set(), None)
    assert p.shape == (n // 32, k, 16) and s.shape == (n // 32, k // bs, 32)
    np.testing.assert_array_equal(nibbles.unpack(p), to_backend(u.astype(np.int8) - 8, BLOCKED))

    lp, ls, lq, lsc = _grid_codes(INT4, rng.standard_normal((32, k)).astype(np.float32))
    x = _x(rng, (rows,), k)
    y0, y1 = pairs_session(Q4KERNEL_OP, k, [(lp, ls), (p, s)], level).run(
        None, {"x": x, "p0": lp, "s0": ls, "p1": p, "s1": s})
    ref = _stock_nbits(b, scales, n, k, level, x)
    top = np.abs(ref).max()
    np.testing.assert_allclose(y1, ref, rtol=0, atol=1e-5 * top)
    q = u.astype(np.int64) - 8
    if level:
        np.testing.assert_allclose(y1, int8_want(x, q, scales), rtol=0, atol=2e-6 * top)
        np.testing.assert_allclose(y0, int8_want(x, lq, lsc), rtol=0,
                                   atol=2e-6 * np.abs(y0).max())
        # float activations would be a step of some activation away
        assert np.abs(y1 - _want(x, q * np.repeat(scales, bs, axis=1))).max() > 1e-4 * top
    else:
        np.testing.assert_allclose(y1, _want(x, q * np.repeat(scales, bs, axis=1)), rtol=0,
                                   atol=2e-6 * top)
        np.testing.assert_allclose(y0, _want(x, INT4.dequantize(lq, lsc)), rtol=0,
                                   atol=2e-6 * np.abs(y0).max())

    asymmetric = helper.make_node("MatMulNBits", ["x", "B", "S", "Z"], ["y"],
                                  domain="com.microsoft", K=k, N=n, bits=4, block_size=bs)
    assert _int4_constant(asymmetric, inits, set(), None) is None
