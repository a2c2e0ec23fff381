"""The PyTorch reference of quantized bundles (edgeadapt/models/quantized.py) against ONNX
Runtime itself: single MatMuls quantized by ONNX Runtime's own tools (quantize_dynamic per
channel for int8, MatMulNBitsQuantizer symmetric blocks of 32 at accuracy level 4 for int4;
experiments/quant_reference_probe.py, which also measures MiniLM layer by layer and whole),
run by ONNX Runtime, beside the reference on the same weight. Then the reference on the tiny
models: what it quantizes, what it leaves alone, and SHiRA adapters fused on codes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeadapt.adapters import LoraConfig, LoraLinear, ShiraConfig, attach, extract
from edgeadapt.adapters.reference import carrying
from edgeadapt.errors import ConfigError
from edgeadapt.format.quant import grid
from edgeadapt.models import load_model, target_weight_names
from edgeadapt.models.quantized import (
    fake_quantize_activations,
    quantize_reference_,
    weight_quants,
)
from edgeadapt.models.targets import quantized_weight_names
from edgeadapt.numeric import rel_error
from experiments.quant_reference_probe import max_rel as _max_rel
from experiments.quant_reference_probe import ort_quantized_matmul as _ort_quantized
from experiments.quant_reference_probe import reference_linear as _reference

ort = pytest.importorskip("onnxruntime")

#: largest |y_ort - y_ref| / max |y_ort| allowed; measured up to 7.8e-7 (module docstring)
TOL = 2e-6


@pytest.mark.parametrize("precision,shape", [("int8", (45, 96)), ("int8", (33, 160)),
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


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_activations_are_quantized_per_row(precision, tmp_path):
    rng = np.random.default_rng(5)
    w = rng.standard_normal((20, 64)).astype(np.float32)
    sess = _ort_quantized(w, precision, tmp_path, rank=3)
    x = rng.standard_normal((3, 5, 64)).astype(np.float32)
    x[2] *= 10  # one batch row's range does not reach the others
    ref = _reference(w, precision, True)
    with torch.no_grad():
        got = ref(torch.from_numpy(x)).numpy()
        alone = ref(torch.from_numpy(x[:1])).numpy()
    assert _max_rel(got, sess.run(None, {"x": x})[0]) < TOL
    np.testing.assert_array_equal(got[:1], alone)


def _tie_rows(rows: int, seed: int = 1) -> np.ndarray:
    """(rows, 32) activations whose codes differ between ``x / a``, ``x * (1 / a)`` and
    ``x * (127 / m)`` (a = m / 127, m = the row's largest magnitude, its first entry)."""
    rng = np.random.default_rng(seed)
    out = []
    for m in rng.uniform(0.5, 3, rows).astype(np.float32):
        a = np.float32(m / np.float32(127))
        x = ((rng.integers(-120, 120, 4096) + 0.5) * a).astype(np.float32)
        x = np.concatenate([x, np.nextafter(x, np.float32(9)), np.nextafter(x, np.float32(-9))])
        split = np.rint(x / a) != np.rint(x * (np.float32(1) / a))
        out.append([m, *x[split][:31]])
    return np.array(out, np.float32)


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_activation_codes_round_as_mlas_does(precision, tmp_path):
    x = _tie_rows(48)
    w = np.eye(32, dtype=np.float32)[::-1].copy()  # y reads every activation code back
    sess = _ort_quantized(w, precision, tmp_path)
    with torch.no_grad():
        got = _reference(w, precision, True)(torch.from_numpy(x)).numpy()
    want = sess.run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


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
    fake_quantize_activations(xg).sum().backward()
    assert torch.equal(xg.grad, torch.ones_like(x))
    zeros = fake_quantize_activations(torch.zeros(2, 64))
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


def _shira_adapter(lm, seed: int, targets: str = "qv", config=None):
    """A SHiRA adapter (or one of ``config``) with random values on ``lm``'s base (lm is left
    as it was)."""
    trained = load_model(lm.name)
    attach(trained.model, config or ShiraConfig(targets=targets, density=0.05, seed=seed))
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
    lora = _shira_adapter(lm, 3, config=LoraConfig(targets="qv", r=2))
    with carrying(lm, lora) as ref:  # LoRA runs unfused beside the codes: a layer inserted
        layer = ref.model.get_submodule(name.removesuffix(".weight"))
        x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
        A, B = (torch.from_numpy(t) for t in (lora.targets[name].A, lora.targets[name].B))
        assert isinstance(layer, LoraLinear) and torch.equal(layer.quant.codes, base[name])
        torch.testing.assert_close(layer(x), x @ deq.new_tensor(
            g.dequantize(codes, scales)).T + (x @ A.T) @ B.T, rtol=1e-5, atol=1e-6)
    assert not any(isinstance(m, LoraLinear) for m in lm.model.modules())
