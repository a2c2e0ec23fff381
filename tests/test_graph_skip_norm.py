"""The residual-add + RMS-norm fusion (edgeadapt.graphs.skip_norm) against numpy and the
unfused graph."""

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgeadapt.graphs.skip_norm import fuse_skip_norms

EPS = 1e-5


def _graph(bias: bool = False, sum_is_output: bool = False) -> onnx.ModelProto:
    """Two Llama-style residual steps: h1 = a + b, y1 = norm(h1); h2 = h1 + y1 @ W,
    y2 = norm(h2); outputs y2 and h2 @ W (h2 read twice: by the norm and the MatMul)."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "w")
    m = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32) / 3, "m")
    inits = [w, m]
    nodes = [helper.make_node("Add", ["a", "bias" if bias else "b"], ["h1"]),
             helper.make_node("SimplifiedLayerNormalization", ["h1", "w"], ["y1"], epsilon=EPS,
                              axis=-1),
             helper.make_node("MatMul", ["y1", "m"], ["z"]),
             helper.make_node("Add", ["h1", "z"], ["h2"]),
             helper.make_node("SimplifiedLayerNormalization", ["h2", "w"], ["y2"], epsilon=EPS,
                              axis=-1),
             helper.make_node("MatMul", ["h2", "m"], ["out"])]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "bias"))
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3, 8])
              for n in (["a"] if bias else ["a", "b"])]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3, 8])
               for n in ["y2", "out"] + (["h1"] if sum_is_output else [])]
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"]).run(None, feeds)


def _numpy(a, b, w, m):
    def norm(h):
        return w * h / np.sqrt((h * h).mean(-1, keepdims=True) + EPS)
    h1 = a + b
    h2 = h1 + norm(h1) @ m
    return norm(h2), h2 @ m


def test_fused_graph_computes_what_the_pairs_did():
    rng = np.random.default_rng(1)
    feeds = {n: rng.standard_normal((2, 3, 8)).astype(np.float32) for n in ("a", "b")}
    model = _graph()
    want = _run(model, feeds)
    w, m = (numpy_helper.to_array(t) for t in model.graph.initializer)
    for got, ref in zip(want, _numpy(feeds["a"], feeds["b"], w, m), strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert fuse_skip_norms(model) == 2
    ops = [n.op_type for n in model.graph.node]
    assert ops == ["SkipSimplifiedLayerNormalization", "MatMul",
                   "SkipSimplifiedLayerNormalization", "MatMul"]
    for got, ref in zip(_run(model, feeds), want, strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_pairs_it_must_not_fuse_are_left_alone():
    model = _graph(bias=True)  # the first Add adds a constant: left; the second is fused
    assert fuse_skip_norms(model) == 1
    assert [n.op_type for n in model.graph.node][:2] == ["Add", "SimplifiedLayerNormalization"]
    model = _graph(sum_is_output=True)  # h1 is a graph output: left; h2 fused
    assert fuse_skip_norms(model) == 1
    assert "h1" in {o for n in model.graph.node if n.op_type == "Add" for o in n.output}
