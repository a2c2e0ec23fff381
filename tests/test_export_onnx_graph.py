"""Graph surgery on small hand-built ONNX graphs: locating live weights by value, the layout
index mapping, external data shared between variants (fast, no torch export)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeadapt.errors import ExportError
from edgeadapt.export import onnx_graph as og
from edgeadapt.format.layout import transposed_from_blocked
from edgeadapt.graphs import blocked as ob


def _graph(weights: dict[str, np.ndarray], nodes: list, x_dim: int, y_dim: int
           ) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", x_dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", y_dim])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _mlp(rng, out=6, inp=5):
    """x (n, inp) -> MatMul(x, val_1 = W1.T) -> Gemm(h, W2, transB=1) -> y (n, out)."""
    W1 = rng.standard_normal((7, inp)).astype(np.float32)
    W2 = rng.standard_normal((out, 7)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "val_1"], ["h"]),
             helper.make_node("Gemm", ["h", "w2"], ["y"], transB=1)]
    return _graph({"val_1": np.ascontiguousarray(W1.T), "w2": W2}, nodes, inp, out), W1, W2


def test_locate_by_value_records_layout_and_moves_to_inputs():
    rng = np.random.default_rng(0)
    model, W1, W2 = _mlp(rng)
    located = og.locate_live_weights(model, {"l1.weight": W1, "l2.weight": W2})
    assert located["l1.weight"] == og.LiveWeight("val_1", og.TRANSPOSED, (5, 7))
    assert located["l2.weight"] == og.LiveWeight("w2", og.AS_IS, (6, 7))
    live = og.make_live_inputs(model, located)
    assert {i.name for i in model.graph.initializer} == set()
    assert [i.name for i in model.graph.input] == ["x", "l1.weight.T", "l2.weight"]
    x = rng.standard_normal((3, 5)).astype(np.float32)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"x": x, live["l1.weight"].name: np.ascontiguousarray(W1.T),
             live["l2.weight"].name: W2}
    np.testing.assert_allclose(sess.run(None, feeds)[0], x @ W1.T @ W2.T, rtol=1e-5)


def test_weight_read_through_transpose_is_refused():
    rng = np.random.default_rng(1)
    W = rng.standard_normal((4, 3)).astype(np.float32)
    nodes = [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "wt"], ["y"])]
    model = _graph({"w": W}, nodes, 3, 4)
    with pytest.raises(ExportError, match="Transpose"):
        og.locate_live_weights(model, {"l.weight": W})


def test_missing_folded_and_ambiguous_weights_are_refused():
    rng = np.random.default_rng(2)
    model, W1, W2 = _mlp(rng)
    with pytest.raises(ExportError, match="no initializer holds"):
        og.locate_live_weights(model, {"l1.weight": W1 * 2})  # only a scaled copy exists
    sym = rng.standard_normal((5, 5)).astype(np.float32)
    sym = sym + sym.T
    nodes = [helper.make_node("MatMul", ["x", "s"], ["y"])]
    with pytest.raises(ExportError, match="ambiguously"):
        og.locate_live_weights(_graph({"s": sym}, nodes, 5, 5), {"l.weight": sym})
    twice = _graph({"a": W2, "b": W2.copy()},
                   [helper.make_node("Gemm", ["x", "a"], ["h"], transB=1),
                    helper.make_node("Gemm", ["h", "b"], ["y"], transB=1)], 7, 6)
    with pytest.raises(ExportError, match="ambiguously"):
        og.locate_live_weights(twice, {"l.weight": W2})


def test_layout_contradicting_the_reader_is_refused():
    rng = np.random.default_rng(3)
    W = rng.standard_normal((4, 3)).astype(np.float32)  # (out, in) fed as-is to MatMul
    model = _graph({"w": np.ascontiguousarray(W.T)}, [
        helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)], 4, 3)
    with pytest.raises(ExportError, match="reads it as"):
        og.locate_live_weights(model, {"l.weight": W})


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (8, 2), (5, 5)])
def test_flat_index_mapping_matches_numpy_transpose(shape):
    rng = np.random.default_rng(4)
    W = rng.standard_normal(shape).astype(np.float32)
    i = np.arange(W.size)
    for layout in (og.AS_IS, og.TRANSPOSED):
        X = og.to_backend_layout(W, layout)
        j = og.torch_flat_to_backend_flat(i, shape, layout)
        np.testing.assert_array_equal(X.reshape(-1)[j], W.reshape(-1))
    # the documented inverse: ONNX flat j of the transposed tensor holds W[j % out, j // out]
    Xt = og.to_backend_layout(W, og.TRANSPOSED).reshape(-1)
    out = shape[0]
    np.testing.assert_array_equal(Xt, W[i % out, i // out])


def test_blocked_layout_by_hand():
    """blocked32: X[b, c, j] == W[32 b + j, c], built here by slicing, not by the module."""
    rng = np.random.default_rng(6)
    W = rng.standard_normal((64, 5)).astype(np.float32)
    X = og.to_backend_layout(W, og.BLOCKED)
    expected = np.stack([W[32 * b:32 * b + 32].T for b in range(2)])  # (2, 5, 32)
    np.testing.assert_array_equal(X, expected)
    np.testing.assert_array_equal(transposed_from_blocked(X), W.T)  # what constants are given
    i = np.arange(W.size)
    j = og.torch_flat_to_backend_flat(i, W.shape, og.BLOCKED)
    np.testing.assert_array_equal(X.reshape(-1)[j], W.reshape(-1))
    # torch (r=33, c=4) -> block 1, row c=4, lane 1: 1 * 5 * 32 + 4 * 32 + 1
    assert og.torch_flat_to_backend_flat(np.array([33 * 5 + 4]), W.shape, og.BLOCKED)[0] == 289
    with pytest.raises(ExportError, match="out % 32"):
        og.to_backend_layout(W[:40], og.BLOCKED)


@pytest.mark.parametrize("x_shape", [(3, 40), (2, 3, 40), (1, 1, 40), (2, 2, 3, 40)])
def test_block_live_matmuls_rewrites_readers_and_keeps_the_product(x_shape):
    """A MatMul-read live weight becomes blocked32 (out % 32 == 0); a Gemm-read one and one
    whose out is not a multiple of 32 keep their layout; outputs equal numpy at every rank."""
    rng = np.random.default_rng(7)
    W1 = rng.standard_normal((64, 40)).astype(np.float32)  # MatMul, blocked
    W3 = rng.standard_normal((24, 64)).astype(np.float32)  # MatMul, out 24: stays transposed
    nodes = [helper.make_node("MatMul", ["x", "val_1"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "val_3"], ["y"], name="mm3")]
    rank = len(x_shape)
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*x_shape[:-1], 24])],
        [numpy_helper.from_array(np.ascontiguousarray(W1.T), "val_1"),
         numpy_helper.from_array(np.ascontiguousarray(W3.T), "val_3")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    live = og.make_live_inputs(model, og.locate_live_weights(model, {"a.weight": W1,
                                                                     "c.weight": W3}))
    live = ob.block_live_matmuls(model, live)
    assert live["a.weight"] == og.LiveWeight("a.weight.B32", og.BLOCKED, (2, 40, 32))
    assert live["c.weight"].layout == og.TRANSPOSED
    onnx.checker.check_model(model)
    assert [n.name for n in model.graph.node if n.op_type == "MatMul"] == ["mm1", "mm3"]
    x = rng.standard_normal(x_shape).astype(np.float32)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"x": x, "a.weight.B32": og.to_backend_layout(W1, og.BLOCKED),
             "c.weight.T": np.ascontiguousarray(W3.T)}
    want = np.maximum(x @ W1.T, 0) @ W3.T
    got = sess.run(None, feeds)[0]
    assert got.shape == want.shape and got.ndim == rank
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # undone for constant sessions: plain MatMuls on (in, out) again, helper nodes gone
    renamed = ob.unblock_live_matmuls(model, {"a.weight.B32"})
    assert renamed == {"a.weight.B32": "a.weight.T"}
    assert [n.op_type for n in model.graph.node] == ["MatMul", "Relu", "MatMul"]
    assert not [i.name for i in model.graph.initializer if i.name.startswith("edgeadapt_")]
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"x": x, "a.weight.T": np.ascontiguousarray(W1.T),
                                               "c.weight.T": np.ascontiguousarray(W3.T)})[0],
                               want, rtol=1e-4, atol=1e-4)
    # the Gemm-read weight of _mlp is left alone
    model2, W1b, W2b = _mlp(rng, out=64, inp=40)
    live2 = ob.block_live_matmuls(model2, og.make_live_inputs(
        model2, og.locate_live_weights(model2, {"l2.weight": W2b})))
    assert live2["l2.weight"].layout == og.AS_IS


def test_variant_reuses_identical_tensors_from_the_base_data_file(tmp_path):
    rng = np.random.default_rng(5)
    base, W1, W2 = _mlp(rng, out=64, inp=40)
    variant, _, _ = _mlp(rng, out=64, inp=40)
    new_w2 = rng.standard_normal(W2.shape).astype(np.float32)
    for init in variant.graph.initializer:  # same W1, a different W2
        src = {"val_1": np.ascontiguousarray(W1.T), "w2": new_w2}[init.name]
        init.CopyFrom(numpy_helper.from_array(src, init.name))
    assert og.save_with_external_data(base, tmp_path, "model.onnx") == ["model.onnx.data"]
    files = og.save_with_external_data(variant, tmp_path, "model.v.onnx", reuse_from="model.onnx")
    assert files == ["model.onnx.data", "model.v.onnx.data"]
    stored = onnx.load(str(tmp_path / "model.v.onnx"), load_external_data=False)
    where = {i.name: {e.key: e.value for e in i.external_data}["location"]
             for i in stored.graph.initializer}
    assert where == {"val_1": "model.onnx.data", "w2": "model.v.onnx.data"}
    x = rng.standard_normal((2, 40)).astype(np.float32)
    for name, w2 in (("model.onnx", W2), ("model.v.onnx", new_w2)):
        sess = ort.InferenceSession(str(tmp_path / name), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(sess.run(None, {"x": x})[0], x @ W1.T @ w2.T, rtol=1e-4)
    assert not list(tmp_path.glob(".*tmp*"))
