"""The PyTorch reference of quantized bundles (edgeadapt/models/quantized.py) against ONNX
Runtime itself: single MatMuls quantized by ONNX Runtime's own tools (quantize_dynamic per
channel for int8, MatMulNBitsQuantizer symmetric blocks of 32 at accuracy level 4 for int4),
run by ONNX Runtime, beside the reference on the same weight. Then the reference on the tiny
models: what it quantizes, what it leaves alone, and SHiRA adapters fused on codes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from edgeadapt.adapters import ShiraConfig, apply_adapter_torch, attach, extract
from edgeadapt.adapters.reference import carrying
from edgeadapt.errors import ConfigError
from edgeadapt.format.quant import grid
from edgeadapt.models import load_model, target_weight_names
from edgeadapt.models.quantized import (
    QuantizedLinear,
    WeightQuant,
    fake_quantize_activations,
    quantize_reference_,
    weight_quants,
)
from edgeadapt.models.targets import quantized_weight_names
from edgeadapt.numeric import rel_error

ort = pytest.importorskip("onnxruntime")

#: largest |y_ort - y_ref| / max |y_ort| allowed; measured up to 4.6e-7 (module docstring)
TOL = 2e-6


def _matmul_model(w: np.ndarray, rank: int) -> onnx.ModelProto:
    n, k = w.shape
    dims = ["b", "m", k][-rank:] if rank == 3 else ["m", k]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "B"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*dims[:-1], n])],
        [numpy_helper.from_array(np.ascontiguousarray(w.T), "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def _ort_quantized(w: np.ndarray, precision: str, tmp_path, rank: int = 2):
    """An ONNX Runtime session of ``x @ w.T`` quantized by ONNX Runtime's own tools."""
    src, dst = tmp_path / "f.onnx", tmp_path / f"{precision}.onnx"
    onnx.save(_matmul_model(w, rank), src)
    if precision == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(src, dst, per_channel=True, weight_type=QuantType.QInt8)
    else:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        q = MatMulNBitsQuantizer(onnx.load(src), bits=4, block_size=32, is_symmetric=True,
                                 accuracy_level=4)
        q.process()
        model = q.model.model
        assert [n.op_type for n in model.graph.node] == ["MatMulNBits"]
        model.ir_version = 9
        onnx.save(model, dst)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(dst), opts, providers=["CPUExecutionProvider"])


def _reference(w: np.ndarray, precision: str, activations: bool) -> QuantizedLinear:
    base = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.from_numpy(w))
    return QuantizedLinear(base, WeightQuant(base.weight, precision, activations))


def _max_rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("precision,shape", [("int8", (45, 96)), ("int8", (33, 45)),
                                             ("int4", (45, 96)), ("int4", (33, 160))])
def test_reference_matches_onnxruntime(precision, shape, tmp_path):
    rng = np.random.default_rng(shape[1])
    w = rng.standard_normal(shape).astype(np.float32)
    sess = _ort_quantized(w, precision, tmp_path)
    ref = _reference(w, precision, activations=True)
    wonly = _reference(w, precision, activations=False)
    for m in (1, 3, 7, 64, 129):
        x = (rng.standard_normal((m, shape[1])) * 2 + 0.3).astype(np.float32)
        want = sess.run(None, {"x": x})[0]
        with torch.no_grad():
            got = ref(torch.from_numpy(x)).numpy()
            plain = wonly(torch.from_numpy(x)).numpy()
        assert _max_rel(got, want) < TOL, (m, _max_rel(got, want))
        # the activation scheme is what is being pinned: weight-only is far off
        assert _max_rel(plain, want) > 100 * TOL


def test_int8_activations_are_one_scale_for_the_whole_tensor(tmp_path):
    rng = np.random.default_rng(5)
    w = rng.standard_normal((20, 64)).astype(np.float32)
    sess = _ort_quantized(w, "int8", tmp_path, rank=3)
    x = rng.standard_normal((3, 5, 64)).astype(np.float32)
    x[2] *= 10  # one batch row sets the scale of all of them
    with torch.no_grad():
        got = _reference(w, "int8", True)(torch.from_numpy(x)).numpy()
    assert _max_rel(got, sess.run(None, {"x": x})[0]) < TOL


def test_live_weights_are_weight_only_and_gradients_pass_straight_through():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((7, 64)).astype(np.float32)
    q, s = grid("int4").quantize(w)
    x = torch.from_numpy(rng.standard_normal((3, 64)).astype(np.float32))
    with torch.no_grad():
        y = _reference(w, "int4", activations=False)(x).numpy()
    np.testing.assert_allclose(y, x.numpy() @ grid("int4").dequantize(q, s).T, rtol=1e-5,
                               atol=1e-5)
    xg = x.clone().requires_grad_(True)
    fake_quantize_activations(xg, "int8").sum().backward()
    assert torch.equal(xg.grad, torch.ones_like(x))
    zeros = fake_quantize_activations(torch.zeros(2, 64), "int8")
    assert torch.equal(zeros, torch.zeros(2, 64))


@pytest.mark.parametrize("name", ["tiny-minilm", "tiny-smollm2"])
def test_quantize_reference_follows_the_policy(name):
    lm = load_model(name)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    live = target_weight_names(lm.model, "qv")
    ids = torch.randint(5, lm.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fp32 = lm.model(input_ids=ids).logits
    names = quantize_reference_(lm, "int4", live=live)
    assert names == quantized_weight_names(lm.model, lm.kind)
    quants = weight_quants(lm.model)
    assert set(quants) == set(names)
    assert all(not quants[n].activations for n in live)
    assert all(quants[n].activations for n in names if n not in live)
    after = lm.model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        quantized = lm.model(input_ids=ids).logits
    assert 0 < rel_error(quantized.numpy(), fp32.numpy()) < 0.5
    with pytest.raises(ConfigError, match="not among"):
        quantize_reference_(lm, "int8", live=["classifier.weight", "lm_head.weight"][:1],
                            quantized=live)
    with pytest.raises(ConfigError, match="unknown weight precision"):
        quantize_reference_(lm, "int2", live=live)


def _shira_adapter(lm, seed: int, targets: str = "qv"):
    """A SHiRA adapter with random values on ``lm``'s base (lm is left as it was)."""
    trained = load_model(lm.name)
    attach(trained.model, ShiraConfig(targets=targets, density=0.05, seed=seed))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trained.model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return extract(trained.model)


def test_shira_on_codes_sums_before_rounding_and_restores():
    lm = load_model("tiny-smollm2")
    live = target_weight_names(lm.model, "qv")
    quantize_reference_(lm, "int8", live=live)
    a, b = _shira_adapter(lm, 1), _shira_adapter(lm, 2)
    quants = weight_quants(lm.model)
    base = {n: q.codes.clone() for n, q in quants.items()}
    name = live[0]
    with carrying(lm, [a, b], scales=[1.0, 0.5]):
        got = quants[name].codes.clone()
        deq = quants[name].dequantized.clone()
    assert all(torch.equal(q.codes, base[n]) for n, q in quants.items())
    g = grid("int8")
    codes, scales = g.quantize(lm.model.get_parameter(name).detach().numpy())
    flat = codes.reshape(-1).copy()
    da, db = a.targets[name], b.targets[name]
    idx = np.union1d(da.indices, db.indices)
    delta = np.zeros(idx.size, np.float32)
    delta[np.searchsorted(idx, da.indices)] += da.values
    delta[np.searchsorted(idx, db.indices)] += np.float32(0.5) * db.values
    flat[idx] = g.requantize(flat[idx], g.scale_at(scales, codes.shape, idx), delta)[0]
    assert np.array_equal(got.numpy().reshape(-1), flat)
    np.testing.assert_array_equal(deq.numpy(), g.dequantize(flat.reshape(codes.shape), scales))
    lora = load_model("tiny-smollm2")
    from edgeadapt.adapters import LoraConfig

    attach(lora.model, LoraConfig(r=2))
    with pytest.raises(ConfigError, match="unfused"):
        apply_adapter_torch(lm.model, extract(lora.model))
