"""Quantization-aware SHiRA (``edgeadapt train --quant``) and post-training rounding onto a
quantized base's grid, on the tiny models. References: ``Grid.requantize`` (numpy) and the
quantized reference model (edgeadapt/models/quantized.py) carrying the exported adapter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgeadapt.adapters import ShiraConfig, ShiraLinear, adapted_layers, attach, extract
from edgeadapt.adapters.reference import carrying
from edgeadapt.errors import UnknownNameError
from edgeadapt.format.quant import codes_weight, grid, live_grid
from edgeadapt.format.quant_adapter import round_to_grid
from edgeadapt.models import example_inputs, load_model
from edgeadapt.models.quantized import QuantizedLinear, WeightQuant, quantize_reference_
from edgeadapt.train import TrainConfig, load_run, train

torch.set_num_threads(2)


def _qat(precision: str, out) -> tuple:
    cfg = TrainConfig(model="tiny-minilm", task="rt-sentiment", method="shira", quant=precision,
                      adapter={"density": 0.1}, max_train=24, max_test=16, max_len=24,
                      batch_size=8, steps=3, lr=0.05)
    return train(cfg, out=out, progress=False), cfg


def _base_weights(names: list[str]) -> dict[str, np.ndarray]:
    params = dict(load_model("tiny-minilm").model.named_parameters())
    return {n: params[n].detach().numpy() for n in names}


@pytest.mark.parametrize("precision", ["int8", "int4", "int4-affine", "int4-affine-live8"])
def test_qat_values_stay_on_the_grid_and_export_exactly(precision, tmp_path):
    """int4-affine-live8: the adapted (live) weights train on the int8 grid, the rest stays on
    int4-affine; the adapter records the grid its values lie on."""
    res, _ = _qat(precision, tmp_path / "run")
    g = live_grid(precision)
    adapter = extract(res.lm.model)
    assert adapter.meta["quant"] == g.name and res.metrics["quant"]["precision"] == precision
    moved = 0
    for name, w in _base_weights(list(adapter.targets)).items():
        delta = adapter.targets[name]
        codes, scales = g.quantize(codes_weight(w, g))
        q = codes.reshape(-1)[delta.indices].astype(np.float64)
        s = g.scale_at(scales, w.shape, delta.indices)
        k = delta.values.astype(np.float64) / s  # codes moved; float32 d: relative 6e-8
        assert (np.abs(k - np.rint(k)) <= 1e-6 * np.maximum(1.0, np.abs(k))).all()
        assert (q + np.rint(k) >= g.qmin).all() and (q + np.rint(k) <= g.qmax).all()
        new, saturated = g.requantize(q.astype(np.int8), s, delta.values)
        assert not saturated.any() and np.array_equal(new, q + np.rint(k))
        moved += int((np.rint(k) != 0).sum())
    assert moved > 0  # the steps moved values across codes
    again = extract(load_run(tmp_path / "run")[0].model)
    assert again.meta["quant"] == g.name
    for name, delta in adapter.targets.items():
        np.testing.assert_array_equal(again.targets[name].values, delta.values)


@pytest.mark.parametrize("precision", ["int8", "int4", "int4-affine", "int4-affine-live8"])
def test_qat_forward_is_the_quantized_reference_with_fused_codes(precision, tmp_path):
    res, _ = _qat(precision, None)
    adapter = extract(res.lm.model)
    adapter.head = {"classifier.weight": res.lm.model.classifier.weight.detach().numpy()}
    ref = load_model("tiny-minilm")
    quantize_reference_(ref, precision, live=list(adapter.targets))
    inputs = example_inputs(ref, batch=3, seq=11)
    with torch.no_grad():
        got = res.lm.model(**inputs).logits
        with carrying(ref, adapter):
            want = ref.model(**inputs).logits
        base = ref.model(**inputs).logits
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got, base, atol=1e-4)


@pytest.mark.parametrize("precision", ["int8", "int4", "int4-affine"])
def test_on_grid_is_requantize_bit_for_bit(precision):
    rng = np.random.default_rng(7)
    w = rng.standard_normal((48, 96)).astype(np.float32)
    quant = WeightQuant(torch.from_numpy(w), precision, False)
    g = grid(precision)
    codes, scales = g.quantize(codes_weight(w, g))
    idx = np.sort(rng.choice(w.size, 3000, replace=False))
    s = g.scale_at(scales, w.shape, idx)
    # values near half-way between codes, where the arithmetic decides the code
    steps = rng.integers(-300, 300, idx.size) + 0.5 + rng.normal(0, 1e-6, idx.size)
    values = (steps * s).astype(np.float32)
    new, _ = g.requantize(codes.reshape(-1)[idx], s, values)
    got = quant.on_grid(torch.from_numpy(idx), torch.from_numpy(values)).numpy()
    np.testing.assert_array_equal(got, new.astype(np.float32) * s)


def test_gradients_reach_the_values_straight_through():
    torch.manual_seed(0)
    lin = nn.Linear(64, 5)
    layer = ShiraLinear(QuantizedLinear(lin, WeightQuant(lin.weight, "int4", False)),
                        torch.tensor([3, 40, 100, 257], dtype=torch.int64))
    with torch.no_grad():
        layer.shira_values.copy_(torch.tensor([0.3, -0.2, 0.05, 1.0]))
    x = torch.randn(6, 64)
    layer(x).square().sum().backward()
    # reference: the same effective weight as a leaf, d loss / d W at the mask
    w = layer.quant.dequantized.clone().view(-1)
    w[layer.shira_indices] = layer.quant.on_grid(layer.shira_indices,
                                                 layer.shira_values).detach()
    w = w.view(5, 64).requires_grad_(True)
    torch.nn.functional.linear(x, w, lin.bias).square().sum().backward()
    want = w.grad.view(-1)[layer.shira_indices]
    assert torch.count_nonzero(layer.shira_values.grad) == 4
    torch.testing.assert_close(layer.shira_values.grad, want)


@pytest.mark.parametrize("precision", ["int8", "int4", "int4-affine", "int4-affine-live8"])
def test_post_training_rounding_is_requantize_of_the_fp32_delta(precision):
    lm = load_model("tiny-minilm")
    attach(lm.model, ShiraConfig(density=0.1))
    gen = torch.Generator().manual_seed(1)
    for _, layer in adapted_layers(lm.model):
        with torch.no_grad():
            layer.shira_values.copy_(torch.randn(layer.shira_values.shape, generator=gen) * 0.2)
    fp32 = extract(lm.model)
    rounded, saturated = round_to_grid(fp32, _base_weights(list(fp32.targets)), precision)
    g = live_grid(precision)  # the targets' grid (int4-affine-live8: int8)
    assert rounded.meta["quant"] == g.name and "quant" not in fp32.meta
    for name, w in _base_weights(list(fp32.targets)).items():
        d = fp32.targets[name]
        codes, scales = g.quantize(codes_weight(w, g))
        q = codes.reshape(-1)[d.indices]
        s = g.scale_at(scales, w.shape, d.indices)
        new, sat = g.requantize(q, s, d.values)
        np.testing.assert_array_equal(rounded.targets[name].values,
                                      (new.astype(np.float32) - q) * s)
        assert saturated[name] == int(sat.sum())
    assert sum(saturated.values()) > 0  # values of 0.2 push int4 / int8 edges out of range
    # the fp32 adapter evaluated on the quantized base is its post-training rounding
    inputs = example_inputs(lm, batch=2, seq=9)
    quantize_reference_(lm, precision, live=list(fp32.targets))
    assert extract(lm.model).targets.keys() == rounded.targets.keys()
    ref = load_model("tiny-minilm")
    quantize_reference_(ref, precision, live=list(fp32.targets))
    with torch.no_grad(), carrying(ref, rounded):
        torch.testing.assert_close(lm.model(**inputs).logits, ref.model(**inputs).logits,
                                   rtol=1e-6, atol=1e-6)


def test_quant_choice_is_checked():
    with pytest.raises(UnknownNameError, match="--quant"):
        TrainConfig(model="tiny-minilm", quant="int3").validate()
