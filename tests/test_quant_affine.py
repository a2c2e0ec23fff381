"""The affine int4 grid (``--weights int4-affine``): an offset per block of 32 split off the
weights (:func:`edgeadapt.format.quant.affine_split`) and added back in float by the graph.

References: hand-built Q4_1 blocks (``m + d j``, ``j`` in 0..15) whose codes, scales and
offsets are known; and the fp32 PyTorch model itself, whose weights, snapped to such blocks, the
affine bundle must hold exactly where the symmetric int4 bundle cannot."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edgeadapt.errors import ConfigError
from edgeadapt.export.bundle import export_base
from edgeadapt.export.onnx_quant import float_activations
from edgeadapt.format import read_manifest
from edgeadapt.format.quant import (
    INT4,
    INT4_AFFINE,
    INT4_AFFINE_LIVE8,
    INT8,
    affine_split,
    codes_weight,
    grid,
    offset_weight,
)
from edgeadapt.models import example_inputs, load_model
from edgeadapt.models.quantized import WeightQuant, quantize_activations
from edgeadapt.models.targets import quantized_weight_grids, quantized_weight_names
from edgeadapt.numeric import rel_error
from edgeadapt.runtime.backends.onnxruntime.session import session_options


def _q4_1(rows: int, blocks: int, seed: int) -> tuple[np.ndarray, ...]:
    """A weight made of Q4_1 blocks: ``(W, d, m, j)``, every block using codes 0 and 15."""
    rng = np.random.default_rng(seed)
    d = (rng.random((rows, blocks)) * 0.02 + 1e-3).astype(np.float32)
    m = (rng.standard_normal((rows, blocks)) * 0.1).astype(np.float32)
    j = rng.integers(0, 16, (rows, blocks, 32))
    j[..., 0], j[..., 1] = 0, 15
    w = (m[..., None] + d[..., None] * j).astype(np.float32).reshape(rows, blocks * 32)
    return w, d, m, j


def test_split_holds_q4_1_blocks_exactly():
    w, d, m, j = _q4_1(24, 5, seed=0)
    shifted, offsets = affine_split(w, INT4_AFFINE)
    codes, scales = INT4_AFFINE.quantize(shifted)
    np.testing.assert_array_equal(codes.reshape(j.shape), j - 8)  # code = j + qmin
    np.testing.assert_allclose(scales, d, rtol=1e-6)
    np.testing.assert_allclose(offsets, m + 8 * d, rtol=1e-5, atol=1e-7)
    held = INT4_AFFINE.dequantize(codes, scales) + offset_weight(offsets, INT4_AFFINE, w.shape)
    assert np.abs(held - w).max() <= 4 * np.spacing(np.abs(w).max())
    # the symmetric grid of the same weight is off by a good share of a step
    sym = INT4.dequantize(*INT4.quantize(w))
    assert np.abs(sym - w).max() > 0.1 * d.min()
    assert np.array_equal(codes_weight(w, INT4), w) and grid("int4-affine") is INT4_AFFINE


def test_a_constant_block_is_its_offset():
    w = np.full((2, 64), 0.3, np.float32)
    w[1, 32:] = np.linspace(-1, 1, 32, dtype=np.float32)
    shifted, offsets = affine_split(w, INT4_AFFINE)
    assert offsets[0, 0] == np.float32(0.3) and not shifted[0].any()
    codes, scales = INT4_AFFINE.quantize(shifted)
    held = INT4_AFFINE.dequantize(codes, scales) + offset_weight(offsets, INT4_AFFINE, w.shape)
    np.testing.assert_array_equal(held[0], w[0])


@pytest.mark.parametrize("activations", [False, True])
def test_reference_linear_adds_the_offsets_in_float(activations):
    w, *_ = _q4_1(16, 3, seed=1)
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((5, 96)).astype(np.float32))
    quant = WeightQuant(torch.from_numpy(w), "int4-affine", activations)
    shifted, offsets = affine_split(w, INT4_AFFINE)
    q_part = torch.from_numpy(INT4_AFFINE.dequantize(*INT4_AFFINE.quantize(shifted)))
    o = torch.from_numpy(offset_weight(offsets, INT4_AFFINE, w.shape))
    xa = quantize_activations(x) if activations else x
    want = xa @ q_part.T + x @ o.T  # the offsets never see the activation quantizer
    torch.testing.assert_close(quant.linear(x, None), want, rtol=1e-6, atol=1e-6)
    if not activations:  # weight-only: the Q4_1 weight itself
        torch.testing.assert_close(quant.linear(x, None), x @ torch.from_numpy(w).T,
                                   rtol=1e-5, atol=1e-5)


def _snapped_tiny_smollm2():
    """tiny SmolLM2 with every weight the int4 bundles quantize snapped onto Q4_1 blocks
    (16 affine values per block of 32), as a model converted from a Q4_1 GGUF holds them."""
    lm = load_model("tiny-smollm2", seed=0)
    with torch.no_grad():
        for name in quantized_weight_names(lm.model, lm.kind):
            p = lm.model.get_parameter(name)
            b = p.detach().numpy().reshape(p.shape[0], -1, 32)
            lo, hi = b.min(-1, keepdims=True), b.max(-1, keepdims=True)
            step = (hi - lo) / 15
            snapped = lo + np.rint((b - lo) / np.where(step > 0, step, 1)) * step
            p.copy_(torch.from_numpy(snapped.reshape(p.shape).astype(np.float32)))
    return lm


def _float_graph_logits(bundle, inputs: dict) -> np.ndarray:
    manifest = read_manifest(bundle)
    from safetensors.numpy import load_file

    feeds = {k: v.numpy() for k, v in inputs.items()}
    live = load_file(str(bundle / manifest.onnxruntime["live_weights"]))
    with float_activations(bundle / manifest.onnxruntime["file"]) as path:
        sess = ort.InferenceSession(str(path), session_options(1),
                                    providers=["CPUExecutionProvider"])
        names = {i.name for i in sess.get_inputs()}
        return sess.run(None, feeds | {k: v for k, v in live.items() if k in names})[0]


def test_affine_bundle_holds_a_q4_1_model_where_symmetric_int4_cannot(tmp_path):
    torch.set_num_threads(1)
    lm = _snapped_tiny_smollm2()
    head = lm.model.get_output_embeddings()
    assert {n: g.name for n, g in quantized_weight_grids(lm.model, lm.kind, "int4-affine")
            .items() if g is not INT4_AFFINE} == {"lm_head.weight": "int8"}
    inputs = {"input_ids": example_inputs(lm, batch=2, seq=9, seed=3)["input_ids"]}
    with torch.no_grad():
        tied = head.weight
        # the reference: the fp32 model, its head (alone, untied) as int8 holds it
        head.weight = torch.nn.Parameter(torch.from_numpy(
            INT8.dequantize(*INT8.quantize(tied.detach().numpy()))))
        want = lm.model(**inputs).logits.numpy()
        head.weight = tied
    errors = {}
    for precision in ("int4-affine", "int4"):
        out = tmp_path / precision
        export_base(lm, out, backends="onnxruntime", targets="qv", precision=precision)
        errors[precision] = rel_error(_float_graph_logits(out, inputs), want)
    assert errors["int4-affine"] < 1e-5, errors
    assert errors["int4"] > 1e-3, errors
    assert read_manifest(tmp_path / "int4-affine").onnxruntime["precision"] == "int4-affine"


def test_live8_holds_the_live_weights_on_int8_and_the_rest_on_affine_int4(tmp_path):
    """``int4-affine-live8``: q and v (the live weights, which adapters edit) on the int8 grid,
    the head on int8, every other quantized weight on the affine int4 grid. Reference: the
    fp32 model with q, v and the head replaced by their int8 values (a Q4_1-snapped model, so
    the affine rest is held exactly); the exported graph (float activations) equals it, and
    the bundle records each live weight's grid."""
    torch.set_num_threads(1)
    lm = _snapped_tiny_smollm2()
    live = [n for n in quantized_weight_names(lm.model, lm.kind)
            if ".q_proj." in n or ".v_proj." in n]
    grids = quantized_weight_grids(lm.model, lm.kind, "int4-affine-live8", live=live)
    assert {n for n, g in grids.items() if g is INT8} == {*live, "lm_head.weight"}
    assert all(g is INT4_AFFINE_LIVE8 for n, g in grids.items() if g is not INT8)
    assert {n: g.name for n, g in quantized_weight_grids(lm.model, lm.kind, "int4-affine",
                                                         live=live).items()
            if g is not INT4_AFFINE} == {"lm_head.weight": "int8"}  # no live grid there
    inputs = {"input_ids": example_inputs(lm, batch=2, seq=9, seed=3)["input_ids"]}
    head = lm.model.get_output_embeddings()
    saved = {n: lm.model.get_submodule(n.removesuffix(".weight")).weight for n in live}
    with torch.no_grad():
        tied = head.weight
        head.weight = torch.nn.Parameter(torch.from_numpy(
            INT8.dequantize(*INT8.quantize(tied.detach().numpy()))))
        for n, w in saved.items():
            lm.model.get_submodule(n.removesuffix(".weight")).weight = torch.nn.Parameter(
                torch.from_numpy(INT8.dequantize(*INT8.quantize(w.detach().numpy()))))
        want = lm.model(**inputs).logits.numpy()
        head.weight = tied
        for n, w in saved.items():
            lm.model.get_submodule(n.removesuffix(".weight")).weight = w
    out = tmp_path / "live8"
    export_base(lm, out, backends="onnxruntime", targets="qv", precision="int4-affine-live8")
    assert rel_error(_float_graph_logits(out, inputs), want) < 1e-5
    manifest = read_manifest(out)
    assert manifest.onnxruntime["precision"] == "int4-affine-live8"
    assert sorted(manifest.weights) == sorted(live)
    assert {w.onnxruntime["quant"]["grid"] for w in manifest.weights.values()} == {"int8"}
    # the runtime's rewrite: q/v on the int8 node, every symmetric int4 MatMulNBits it can read
    # (k, o, the MLP; not the int8 head) on the int4 one, though no live weight is int4
    import onnx

    from edgeadapt.graphs.quantized import (
        _int4_constant,
        kernel_quantized_matmuls,
        quantized_inputs,
    )

    model = onnx.load(str(out / manifest.onnxruntime["file"]), load_external_data=False)
    before = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert kernel_quantized_matmuls(model, set(quantized_inputs(model)), set(), out,
                                    every_constant=True).replaced == len(live)
    ops = {n.op_type for n in model.graph.node if n.domain == "edgeadapt"}
    assert {"QBlockedMatMul", "Q4BlockedMatMul"} <= ops
    inits = {i.name: i for i in model.graph.initializer}
    left = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(left) < len(before) and all(
        _int4_constant(n, inits, set(), out) is None for n in left)


def test_executorch_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match="ONNX Runtime only"):
        export_base(load_model("tiny-smollm2", seed=0), tmp_path / "b",
                    backends="executorch", precision="int4-affine")
    assert not (tmp_path / "b" / "bundle.json").exists()
