"""edgeadapt's quantized ONNX Runtime kernel, ``edgeadapt.QBlockedMatMul``
(kernels/blocked_matmul.cpp): int8 codes in the blocked32 layout with a scale per row and group
of columns (the grids' blocks of 32, or one group per row), against float64 numpy on the
dequantized weight, on the vector and the portable path, and an in-place edit of the codes seen
by the next run. With int8 activations (``accuracy_level`` 4): against float64 numpy on MLAS's
quantization of x and integer sums (``int8_want``), against ONNX Runtime's own 8-bit
MatMulNBits at level 4 on the same codes, and the same bits on every path. Torch-free."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper
from test_onnxruntime_kernel import op_session
from test_onnxruntime_q4kernel import int8_want, pairs_session, path_libraries

from edgeadapt.format.layout import BLOCKED, to_backend
from edgeadapt.format.quant import INT4, INT8, Grid
from edgeadapt.graphs.blocked import QKERNEL_OP
from edgeadapt.graphs.quantized import INT8_ACTIVATIONS
from edgeadapt.runtime.backends.onnxruntime import kernel as ok

ort = pytest.importorskip("onnxruntime")
REASON = ok.unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"kernel unavailable: {REASON}")


def _session(k: int, rank: int, threads: int = 1, library: Path | None = None):
    dims = [f"d{i}" for i in range(rank - 1)] + [k]
    return op_session(QKERNEL_OP, [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, dims),
        helper.make_tensor_value_info("q", TensorProto.INT8, ["nb", k, 32]),
        helper.make_tensor_value_info("s", TensorProto.FLOAT, ["nb", "g", 32])],
        threads, library)


def _buffers(grid: Grid, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes, scales) in the backend layout, and the dequantized weight (out, in)."""
    q, s = grid.quantize(w)
    return to_backend(q, BLOCKED), to_backend(s, BLOCKED), grid.dequantize(q, s)


def _want(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return x.astype(np.float64) @ w.T.astype(np.float64)


#: one scale per row (one group of K = 45 columns: the odd, unrolled-remainder path)
ROW45 = Grid("int8-row", 8, 45)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("grid,k", [(ROW45, 45), (INT8, 96), (INT4, 96), (INT4, 32)])
@pytest.mark.parametrize("lead", [(1,), (5,), (13,), (2, 48), (97,), (0,)])
def test_op_matches_numpy(grid, k, lead, threads):
    """Row counts across the tile and the chunk, K not a multiple of the unroll (one group
    per row), one and several groups."""
    rng = np.random.default_rng(k * 10 + lead[-1])
    n = 64
    q, s, wq = _buffers(grid, rng.standard_normal((n, k)).astype(np.float32))
    x = rng.standard_normal((*lead, k)).astype(np.float32)
    y = _session(k, len(lead) + 1, threads).run(None, {"x": x, "q": q, "s": s})[0]
    assert y.shape == (*lead, n)
    np.testing.assert_allclose(y, _want(x, wq), rtol=1e-5, atol=1e-4)


def test_portable_path_matches_numpy(tmp_path, monkeypatch):
    """The plain C++ loops (built with -mno-avx512f, a library of its own)."""
    monkeypatch.setenv("EDGEADAPT_CACHE", str(tmp_path))
    portable = ok.library_path(("-mno-avx512f",))
    rng = np.random.default_rng(5)
    for grid, k in ((ROW45, 45), (INT8, 64), (INT4, 64)):
        q, s, wq = _buffers(grid, rng.standard_normal((32, k)).astype(np.float32))
        for lead in ((1,), (13,)):
            x = rng.standard_normal((*lead, k)).astype(np.float32)
            y = _session(k, 2, library=portable).run(None, {"x": x, "q": q, "s": s})[0]
            np.testing.assert_allclose(y, _want(x, wq), rtol=1e-5, atol=1e-4)


def test_codes_edited_in_place_are_read():
    """Bound once (as the live store binds), edited in place: the next run follows the codes
    (a packed copy would not)."""
    rng = np.random.default_rng(1)
    k = 64
    q, s, _ = _buffers(INT4, rng.standard_normal((32, k)).astype(np.float32))
    sess = _session(k, 2)
    binding = sess.io_binding()
    binding.bind_ortvalue_input("q", ort.OrtValue.ortvalue_from_numpy(q))
    binding.bind_ortvalue_input("s", ort.OrtValue.ortvalue_from_numpy(s))
    x = rng.standard_normal((1, k)).astype(np.float32)
    outs = []
    for _ in range(2):
        binding.bind_cpu_input("x", x)
        binding.bind_output("y", "cpu")
        sess.run_with_iobinding(binding)
        outs.append(binding.get_outputs()[0].numpy())
        want = _want(x, INT4.dequantize(np.ascontiguousarray(
            q.transpose(0, 2, 1).reshape(32, k)), s.transpose(0, 2, 1).reshape(32, -1)))
        np.testing.assert_allclose(outs[-1], want, rtol=1e-5, atol=1e-4)
        q[0, 3, 5] = 7 if q[0, 3, 5] != 7 else -8
    assert not np.allclose(outs[0], outs[1])


def test_op_refuses_scales_that_do_not_fit():
    sess = _session(64, 2)
    q = np.zeros((1, 64, 32), np.int8)
    for s in (np.ones((1, 3, 32), np.float32), np.ones((2, 1, 32), np.float32)):
        with pytest.raises(Exception, match="scales"):
            sess.run(None, {"x": np.ones((1, 64), np.float32), "q": q, "s": s})


@pytest.fixture(scope="module")
def libraries(tmp_path_factory) -> list[Path | None]:
    return path_libraries(tmp_path_factory)


#: (grid, K, N of each pair): one group of 32 per scale, one of 96, K not a multiple of 32
LEVEL4 = [(INT8, 160, (96, 32)), (Grid("int8-row96", 8, 96), 96, (32, 64)), (INT4, 64, (32,)),
          (ROW45, 45, (64,))]


@pytest.mark.parametrize("grid,k,ns", LEVEL4)
@pytest.mark.parametrize("rows", [1, 7])
def test_int8_activations_match_numpy_and_stock_onnxruntime(grid, k, ns, rows, libraries):
    """accuracy_level 4, several pairs in one node, x with a zero block: float64 numpy on x
    quantized as MLAS quantizes it and integer sums; ONNX Runtime's own 8-bit MatMulNBits at
    level 4 on the same codes (offset by 128, its layout) where its blocks of 32 are the
    grid's groups, to 1e-5 of its largest output; with groups of whole blocks of x the same
    bits on every path (the same integers and float operations on each,
    test_onnxruntime_q4kernel.PATH_FLAGS) and in every row of several as in that row alone
    (a prefill and a decode step agree bit for bit)."""
    from onnx import numpy_helper

    rng = np.random.default_rng(k + rows)
    made = []
    for n in ns:
        q, s = grid.quantize(rng.standard_normal((n, k)).astype(np.float32))
        made.append((to_backend(q, BLOCKED), to_backend(s, BLOCKED), q, s))
    x = rng.standard_normal((rows, k)).astype(np.float32)
    x[0, :32] = 0
    feeds = {"x": x, **{f"p{i}": m[0] for i, m in enumerate(made)},
             **{f"s{i}": m[1] for i, m in enumerate(made)}}
    ys = [pairs_session(QKERNEL_OP, k, [m[:2] for m in made], INT8_ACTIVATIONS,
                        library=lib).run(None, feeds) for lib in libraries]
    whole = k % grid.group == 0 and grid.group % 32 == 0
    for i, (_, _, q, s) in enumerate(made):
        y, want = ys[0][i], int8_want(x, q, s)
        top = np.abs(want).max()
        np.testing.assert_allclose(y, want, rtol=0, atol=2e-6 * top)
        for other in ys[1:]:
            if whole:
                np.testing.assert_array_equal(other[i], y)
            else:
                np.testing.assert_allclose(other[i], y, rtol=0, atol=1e-6 * top)
        if whole and rows > 1:
            sess = pairs_session(QKERNEL_OP, k, [m[:2] for m in made], INT8_ACTIVATIONS)
            for r in range(rows):
                one = sess.run(None, {**feeds, "x": x[r:r + 1]})[i]
                np.testing.assert_array_equal(one[0], y[r])
        if grid.group != 32:
            continue
        n = q.shape[0]
        b = (q.astype(np.int16) + 128).astype(np.uint8).reshape(n, k // 32, 32)
        node = helper.make_node("MatMulNBits", ["x", "B", "S"], ["y"], domain="com.microsoft",
                                K=k, N=n, bits=8, block_size=32, accuracy_level=4)
        graph = helper.make_graph(
            [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, k])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(b, "B"), numpy_helper.from_array(s, "S")])
        model = helper.make_model(graph, opset_imports=[
            helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
        model.ir_version = 9
        ref = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
