"""The affine int4 grid's offset term on edgeadapt's ONNX Runtime kernel,
``edgeadapt.BlockOffsets`` (kernels/block_offsets.h): the op against float64 numpy, and the
load-time rewrite (:func:`edgeadapt.graphs.offsets.kernel_block_offsets`) of the graph the
exporter writes (:func:`edgeadapt.export.onnx_quant.add_offset_terms`) against stock ONNX
Runtime on the same graph and against the unsplit weights. Torch-free."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeadapt.export.onnx_quant import add_offset_terms
from edgeadapt.format.quant import INT4_AFFINE, affine_split
from edgeadapt.graphs.blocked import KERNEL_DOMAIN
from edgeadapt.graphs.offsets import BLOCK_SUMS, OFFSETS_OP, kernel_block_offsets
from edgeadapt.numeric import rel_error
from edgeadapt.runtime.backends.onnxruntime import kernel as ok
from edgeadapt.runtime.backends.onnxruntime.session import session_options

ort = pytest.importorskip("onnxruntime")
REASON = ok.unavailable()
needs_kernel = pytest.mark.skipif(REASON is not None, reason=f"kernel unavailable: {REASON}")


def _session(model: onnx.ModelProto, threads: int, kernel: bool):
    so = session_options(threads)
    if kernel:
        ok.register(so)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _block_sums(x: np.ndarray, blocks: int) -> np.ndarray:
    """S[..., b]: the sum of x over input block b (float64)."""
    return x.astype(np.float64).reshape(*x.shape[:-1], blocks, x.shape[-1] // blocks).sum(-1)


def _op_model(k: int, lead_rank: int, pairs: list[tuple[int, int]]) -> onnx.ModelProto:
    """One ``BlockOffsets(x, part_0, o_0, ...)`` node, ``pairs``: (B_i, N_i)."""
    lead = [f"d{i}" for i in range(lead_rank)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [*lead, k])]
    for i, (b, n) in enumerate(pairs):
        inputs += [helper.make_tensor_value_info(f"p{i}", TensorProto.FLOAT, [*lead, n]),
                   helper.make_tensor_value_info(f"o{i}", TensorProto.FLOAT, [b, n])]
    graph = helper.make_graph(
        [helper.make_node(OFFSETS_OP, [i.name for i in inputs],
                          [f"y{i}" for i in range(len(pairs))], domain=KERNEL_DOMAIN)],
        "g", inputs,
        [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None)
         for i in range(len(pairs))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid(KERNEL_DOMAIN, 1)])
    model.ir_version = 9
    return model


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("lead", [(1,), (16,), (17,), (2, 40), (0,)])
def test_op_matches_numpy(lead, threads):
    """Row counts around the op's 16-row parallel item, a 3-D x, no rows; three pairs of
    different widths, one on blocks of 16 where the others take 32."""
    rng = np.random.default_rng(lead[-1] * 10 + threads)
    k, pairs = 96, [(3, 64), (3, 40), (6, 24)]
    x = rng.standard_normal((*lead, k)).astype(np.float32)
    feeds = {"x": x}
    for i, (b, n) in enumerate(pairs):
        feeds[f"p{i}"] = rng.standard_normal((*lead, n)).astype(np.float32)
        feeds[f"o{i}"] = rng.standard_normal((b, n)).astype(np.float32)
    ys = _session(_op_model(k, len(lead), pairs), threads, True).run(None, feeds)
    for i, (y, (b, n)) in enumerate(zip(ys, pairs, strict=True)):
        want = feeds[f"p{i}"] + _block_sums(x, b) @ feeds[f"o{i}"].astype(np.float64)
        assert y.shape == (*lead, n)
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_op_refuses_mismatched_shapes():
    sess = _session(_op_model(96, 1, [(5, 8)]), 1, True)  # 5 blocks do not divide 96 columns
    feeds = {"x": np.ones((2, 96), np.float32), "p0": np.ones((2, 8), np.float32),
             "o0": np.ones((5, 8), np.float32)}
    with pytest.raises(Exception, match="B dividing K"):
        sess.run(None, feeds)
    sess = _session(_op_model(96, 1, [("b", "n")]), 1, True)
    for bad in ({"p0": np.ones((3, 8), np.float32), "o0": np.ones((3, 8), np.float32)},
                {"p0": np.ones((2, 8), np.float32), "o0": np.ones((3, 9), np.float32)}):
        with pytest.raises(Exception, match="B dividing K"):
            sess.run(None, feeds | bad)


def _affine_model(k: int, outs: list[int], extra_reader: bool = False
                  ) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The exporter's affine graph of a small network (weights in torch layout, returned):
    ``x (B, T, k)`` read by ``w0``, ``w1``, ... (``outs``), with ``Relu(y0)`` standing between
    the readers in graph order, and ``h = Relu(y0)`` read by ``w_last`` (k x k): two inputs
    whose offset terms the rewrite merges. ``extra_reader``: x's block sums are also an
    output, so that x must be left as it is."""
    rng = np.random.default_rng(7)
    weights = {f"w{i}": rng.standard_normal((n, k)).astype(np.float32)
               for i, n in enumerate(outs)}
    weights["w_last"] = rng.standard_normal((k, k)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w0.T"], ["y0"], name="mm0"),
             helper.make_node("Relu", ["y0"], ["h"], name="relu")]
    nodes += [helper.make_node("MatMul", ["x", f"w{i}.T"], [f"y{i}"], name=f"mm{i}")
              for i in range(1, len(outs))]
    nodes.append(helper.make_node("MatMul", ["h", "w_last.T"], ["z"], name="mm_last"))
    inits = [numpy_helper.from_array(np.ascontiguousarray(w.T), f"{n}.T")
             for n, w in weights.items()]
    outputs = [f"y{i}" for i in range(len(outs))] + ["z"]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", k])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    split = {n: affine_split(w, INT4_AFFINE) for n, w in weights.items()}
    add_offset_terms(model, weights, {n: s[0] for n, s in split.items()},
                     {n: s[1] for n, s in split.items()}, INT4_AFFINE.group)
    if extra_reader:
        sums = next(n.output[0] for n in model.graph.node if n.input[0] == "x"
                    and n.input[1].startswith(BLOCK_SUMS))
        model.graph.output.append(helper.make_tensor_value_info(sums, TensorProto.FLOAT, None))
    return model, weights


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("tokens", [1, 37])
def test_rewrite_merges_each_inputs_offset_terms_and_matches_stock(tokens, threads):
    """x's three readers and h's one: 2 * 4 + 2 offset nodes become two BlockOffsets, placed
    after the parts they read (Relu(y0) stood between them), with the same outputs as stock
    ONNX Runtime running the exporter's graph and as x @ W^T with the unsplit weights."""
    k, outs = 64, [64, 32, 96]
    model, weights = _affine_model(k, outs)
    stock = _session(model, threads, False)
    before = len(model.graph.node)
    assert kernel_block_offsets(model) == 4
    ops = [n.op_type for n in model.graph.node]
    assert ops.count(OFFSETS_OP) == 2 and len(ops) == before - 10 + 2
    assert not [i for i in model.graph.initializer if i.name.startswith(BLOCK_SUMS)]
    seen = {"x"} | {i.name for i in model.graph.initializer}
    for node in model.graph.node:  # topologically sorted: every input made before
        assert set(node.input) <= seen, node.name
        seen |= set(node.output)
    x = np.random.default_rng(tokens).standard_normal((2, tokens, k)).astype(np.float32)
    got = _session(model, threads, True).run(None, {"x": x})
    want = stock.run(None, {"x": x})
    assert [o.name for o in model.graph.output] == [o.name for o in stock.get_outputs()]
    for g, w in zip(got, want, strict=True):  # float32 sums in another order: ~1e-7
        assert g.shape == w.shape and rel_error(g, w) < 1e-6
    x64 = x.astype(np.float64)
    for i in range(len(outs)):
        assert rel_error(got[i], x64 @ weights[f"w{i}"].T) < 1e-6
    h = np.maximum(x64 @ weights["w0"].T, 0)
    assert rel_error(got[-1], h @ weights["w_last"].T) < 1e-6


@needs_kernel
def test_sums_read_elsewhere_are_left_as_they_are():
    model, _ = _affine_model(64, [64, 32], extra_reader=True)
    assert kernel_block_offsets(model) == 1  # h's term only: x's sums are also an output
    x = np.random.default_rng(0).standard_normal((1, 3, 64)).astype(np.float32)
    want = _session(_affine_model(64, [64, 32], extra_reader=True)[0], 1, False).run(
        None, {"x": x})
    for g, w in zip(_session(model, 1, True).run(None, {"x": x}), want, strict=True):
        assert g.shape == w.shape and rel_error(g, w) < 1e-6


def test_without_offset_terms_nothing_changes():
    model, _ = _affine_model(64, [32])
    for node in model.graph.node:  # a graph without the exporter's block sums
        if node.input[1:] and node.input[1].startswith(BLOCK_SUMS):
            node.input[1] = "w0.T"
    text = model.SerializeToString()
    assert kernel_block_offsets(model) == 0 and model.SerializeToString() == text
