"""edgeadapt's int4 ONNX Runtime kernel, ``edgeadapt.Q4BlockedMatMul``
(kernels/blocked_matmul.cpp): int4 codes packed two per byte in the blocked32 layout
(:mod:`edgeadapt.format.nibbles`) with a scale per row and group of columns, against float64
numpy on the dequantized weight and against the int8 form ``edgeadapt.QBlockedMatMul`` on the
unpacked codes, on the vector and the portable path; an in-place edit of the packed codes seen
by the next run; packed codes of the wrong shape or type refused. Torch-free."""

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
             op: str = Q4KERNEL_OP, codes: list | None = None):
    """One ``y = op(x, p, s)`` node: the int4 op on packed codes ``p`` (uint8), or with
    ``op=QKERNEL_OP`` the int8 op on one code a byte (int8)."""
    dims = [f"d{i}" for i in range(rank - 1)] + [k]
    int4 = op == Q4KERNEL_OP
    return op_session(op, [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, dims),
        helper.make_tensor_value_info("p", TensorProto.UINT8 if int4 else TensorProto.INT8,
                                      codes or ["nb", k, 16 if int4 else 32]),
        helper.make_tensor_value_info("s", TensorProto.FLOAT, ["nb", "g", 32])],
        threads, library)


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


@pytest.mark.parametrize("grid,k", GRIDS)
@pytest.mark.parametrize("lead", [(1,), (13,), (97,)])
def test_op_equals_the_int8_op_on_the_unpacked_codes(grid, k, lead):
    """The same float codes multiplied in the same order: the same bits as QBlockedMatMul."""
    rng = np.random.default_rng(k + lead[-1])
    p, s, q, _ = _buffers(grid, rng.standard_normal((96, k)).astype(np.float32))
    np.testing.assert_array_equal(nibbles.unpack(p), q)
    x = rng.standard_normal((*lead, k)).astype(np.float32)
    y4 = _session(k, 2, 2).run(None, {"x": x, "p": p, "s": s})[0]
    y8 = _session(k, 2, 2, op=QKERNEL_OP).run(None, {"x": x, "p": q, "s": s})[0]
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


@pytest.mark.parametrize("rows", [1, 13])
def test_packed_codes_edited_in_place_are_read(rows):
    """Bound once (as the live store binds), one byte (two codes) edited in place: the next
    run follows the codes (a packed copy would not)."""
    rng = np.random.default_rng(1)
    k, n = 64, 32
    p, s, _, _ = _buffers(INT4, rng.standard_normal((n, k)).astype(np.float32))
    sess = _session(k, 2)
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
        want = _want(x, INT4.dequantize(q, to_torch(s, (n, k // 32), BLOCKED)))
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


def test_pairs_and_an_absorbed_matmulnbits_match_stock_onnxruntime():
    """kernel_quantized_matmuls-style merge, checked op by op: a constant symmetric int4
    ``MatMulNBits`` (ONNX Runtime's layout: code k of a block in byte k // 2, low nibble first,
    offset 8) re-laid by ``_int4_constant`` and read by one ``Q4BlockedMatMul`` beside a live
    pair equals ONNX Runtime's own MatMulNBits (float activations, accuracy level 0) and float64
    numpy; an asymmetric one (zero points) is left alone."""
    from onnx import numpy_helper

    from edgeadapt.graphs.quantized import _int4_constant

    rng = np.random.default_rng(11)
    n, k, bs = 64, 96, 32
    u = rng.integers(0, 16, size=(n, k)).astype(np.uint8)  # MatMulNBits' offset codes
    b = (u[:, 0::2] | (u[:, 1::2] << 4)).reshape(n, k // bs, bs // 2)
    scales = rng.uniform(0.01, 0.1, size=(n, k // bs)).astype(np.float32)
    w = (u.astype(np.float64) - 8) * np.repeat(scales, bs, axis=1)  # (out, in)
    inits = {"B": numpy_helper.from_array(b, "B"), "S": numpy_helper.from_array(scales, "S")}
    nbits = helper.make_node("MatMulNBits", ["x", "B", "S"], ["y"], domain="com.microsoft",
                             K=k, N=n, bits=4, block_size=bs, accuracy_level=0)
    p, s = (numpy_helper.to_array(t) for t in _int4_constant(nbits, 0, inits, set(), None))
    assert p.shape == (n // 32, k, 16) and s.shape == (n // 32, k // bs, 32)
    np.testing.assert_array_equal(nibbles.unpack(p), to_backend(u.astype(np.int8) - 8, BLOCKED))

    live_w = rng.standard_normal((32, k)).astype(np.float32)
    lp, ls, _, live_deq = _buffers(INT4, live_w)
    x = rng.standard_normal((3, k)).astype(np.float32)
    ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])] + [
        helper.make_tensor_value_info(name, t, list(a.shape)) for name, t, a in (
            ("p0", TensorProto.UINT8, lp), ("s0", TensorProto.FLOAT, ls),
            ("p1", TensorProto.UINT8, p), ("s1", TensorProto.FLOAT, s))]
    graph = helper.make_graph(
        [helper.make_node(Q4KERNEL_OP, ["x", "p0", "s0", "p1", "s1"], ["y0", "y1"],
                          domain="edgeadapt")], "g", ins,
        [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(2)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("edgeadapt", 1)])
    model.ir_version = 9
    so = ort.SessionOptions()
    ok.register(so)
    sess = ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    y0, y1 = sess.run(None, {"x": x, "p0": lp, "s0": ls, "p1": p, "s1": s})
    stock_graph = helper.make_graph(
        [nbits], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], list(inits.values()))
    stock = helper.make_model(stock_graph, opset_imports=[helper.make_opsetid("", 17),
                                                          helper.make_opsetid("com.microsoft",
                                                                              1)])
    stock.ir_version = 9
    ref = ort.InferenceSession(stock.SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y1, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y1, _want(x, w), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y0, _want(x, live_deq), rtol=1e-5, atol=1e-5)

    asymmetric = helper.make_node("MatMulNBits", ["x", "B", "S", "Z"], ["y"],
                                  domain="com.microsoft", K=k, N=n, bits=4, block_size=bs)
    assert _int4_constant(asymmetric, 0, inits, set(), None) is None
