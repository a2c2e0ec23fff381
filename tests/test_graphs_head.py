"""The LM head rewrite (:mod:`edgeadapt.graphs.head`): ``logits_to_keep`` keeps the last k
positions' logits (0: all, as transformers' argument), the vocabulary in chunks. Checked
against numpy (float head, read through ``Transpose`` as the exporter writes it, or as a plain
initializer) and against the same graph before the rewrite (``MatMulNBits`` heads, 4 and 8 bits,
with and without zero points): every column is its own dot product, so the chunks change no
logit."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ort = pytest.importorskip("onnxruntime")

from edgeadapt.graphs.head import KEEP_INPUT, keep_last_logits  # noqa: E402

HIDDEN, VOCAB = 64, 1000


def _graph(head: list, inits: list, domains=()) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["h"], name="norm"), *head], "head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, HIDDEN])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, None, VOCAB])], inits)
    opsets = [helper.make_opsetid("", 17), *(helper.make_opsetid(d, 1) for d in domains)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)


def _run(model: onnx.ModelProto, x: np.ndarray, keep: int | None = None) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = {"x": x} if keep is None else {"x": x, KEEP_INPUT: np.array(keep, np.int64)}
    return sess.run(None, feeds)[0]


def _float_head(transposed: bool) -> tuple[onnx.ModelProto, np.ndarray]:
    w = np.random.default_rng(0).standard_normal((VOCAB, HIDDEN)).astype(np.float32)
    if transposed:  # the exporter's form: MatMul(h, Transpose(lm_head.weight))
        nodes = [helper.make_node("Transpose", ["lm_head.weight"], ["wt"], perm=[1, 0]),
                 helper.make_node("MatMul", ["h", "wt"], ["logits"], name="head")]
        return _graph(nodes, [numpy_helper.from_array(w, "lm_head.weight")]), w
    nodes = [helper.make_node("MatMul", ["h", "wt"], ["logits"], name="head")]
    return _graph(nodes, [numpy_helper.from_array(np.ascontiguousarray(w.T), "wt")]), w


@pytest.mark.parametrize("transposed", [True, False])
@pytest.mark.parametrize("chunk_bytes", [1 << 30, 80_000])
def test_float_head_keeps_last_positions_in_chunks(transposed, chunk_bytes):
    model, w = _float_head(transposed)
    info = keep_last_logits(model, chunk_bytes=chunk_bytes)
    assert info["head_bytes"] == VOCAB * HIDDEN * 4
    # 256,000 bytes in chunks of at most 80,000: 4 chunks of 256 columns (the last 232)
    assert info["chunks"] == (1 if chunk_bytes > info["head_bytes"] else 4)
    assert sum(n.op_type == "MatMul" for n in model.graph.node) == info["chunks"]
    onnx.checker.check_model(model)
    x = np.random.default_rng(1).standard_normal((1, 7, HIDDEN)).astype(np.float32)
    want = np.maximum(x, 0) @ w.T
    for keep, positions in [(0, 7), (1, 1), (3, 3), (7, 7), (50, 7)]:
        got = _run(model, x, keep)
        assert got.shape == (1, positions, VOCAB)
        np.testing.assert_allclose(got, want[:, 7 - positions:], rtol=1e-5, atol=1e-4)
    if info["chunks"] > 1:  # the chunk boundaries: each column's logit where it belongs
        assert np.argmax(_run(model, x, 1)[0, 0]) == np.argmax(want[0, -1])


def _nbits_head(bits: int, zero_points: bool) -> onnx.ModelProto:
    rng = np.random.default_rng(2)
    block = 32
    blocks = HIDDEN // block
    per_byte = 8 // bits
    codes = rng.integers(0, 1 << bits, size=(VOCAB, blocks, block), dtype=np.uint8)
    packed = np.zeros((VOCAB, blocks, block // per_byte), np.uint8)
    for j in range(per_byte):
        packed |= codes[:, :, j::per_byte] << (bits * j)
    scales = rng.uniform(0.01, 0.1, size=VOCAB * blocks).astype(np.float32)
    inits = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "scales")]
    inputs = ["h", "B", "scales"]
    if zero_points:
        zp = rng.integers(0, 1 << bits, size=(VOCAB, blocks), dtype=np.uint8)
        if bits == 4:  # two per byte, each row padded to whole bytes
            zp = (zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8)
        inits.append(numpy_helper.from_array(zp.reshape(-1), "zp"))
        inputs.append("zp")
    node = helper.make_node("MatMulNBits", inputs, ["logits"], name="head", domain="com.microsoft",
                            K=HIDDEN, N=VOCAB, bits=bits, block_size=block)
    return _graph([node], inits, domains=["com.microsoft"])


@pytest.mark.parametrize(("bits", "zero_points"), [(4, False), (4, True), (8, False), (8, True)])
def test_nbits_head_chunks_equal_the_whole_head(bits, zero_points):
    whole = _nbits_head(bits, zero_points)
    model = _nbits_head(bits, zero_points)
    info = keep_last_logits(model, chunk_bytes=VOCAB * HIDDEN * bits // 8 // 3)
    assert info["chunks"] == 4 and sum(n.op_type == "MatMulNBits" for n in model.graph.node) == 4
    assert not {"B", "scales", "zp"} & {i.name for i in model.graph.initializer}  # split, gone
    x = np.random.default_rng(3).standard_normal((1, 5, HIDDEN)).astype(np.float32)
    want = _run(whole, x)
    np.testing.assert_allclose(_run(model, x, 0), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_run(model, x, 2), want[:, 3:], rtol=1e-5, atol=1e-5)


def test_other_heads_are_refused():
    model = _graph([helper.make_node("Identity", ["h"], ["logits"])], [])
    with pytest.raises(ValueError, match="not produced by a MatMul"):
        keep_last_logits(model)
    model, _ = _float_head(True)
    keep_last_logits(model)
    with pytest.raises(ValueError, match="already has an input"):
        keep_last_logits(model)
