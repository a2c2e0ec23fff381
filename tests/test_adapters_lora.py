"""LoRA: the formula, init, extraction/application parity, checkpoints; the shared API."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from edgeadapt.adapters import (
    CONFIGS,
    LoraConfig,
    LoraLinear,
    ShiraConfig,
    SiraConfig,
    SoraConfig,
    adapter_state,
    apply_adapter_torch,
    attach,
    config_from_dict,
    extract,
    load_adapter_state,
    trainable_parameters,
)
from edgeadapt.errors import (
    AdapterFormatError,
    ConfigError,
    TargetMismatchError,
    UnknownNameError,
)
from edgeadapt.format.fingerprint import weight_sha256
from edgeadapt.models import example_inputs, forward, load_model, resolve_targets

torch.set_num_threads(1)


def _train(lm, inputs, steps=3):
    opt = torch.optim.Adam(trainable_parameters(lm.model), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        forward(lm, inputs).logsumexp(-1).mean().backward()
        opt.step()


def test_layer_formula_by_hand():
    torch.manual_seed(0)
    base = nn.Linear(6, 4)
    layer = LoraLinear(base, r=2, alpha=3.0)
    x = torch.randn(5, 6)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)   # B = 0 at init
    with torch.no_grad():
        layer.lora_B.normal_()
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    expected = x @ base.weight.detach().T + base.bias.detach() + 1.5 * (x @ A.T) @ B.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.delta_weight(), 1.5 * B @ A)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(16, 8), r=4, alpha=4.0, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(32, 16)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))
    expected = F.linear(x, layer.weight, layer.bias) + (x @ layer.lora_A.T) @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.train()
    assert not torch.allclose(layer(x), expected, atol=1e-3)


@pytest.mark.parametrize("model", ["tiny-minilm", "tiny-smollm2"])
def test_attach_train_extract_apply_parity(model):
    lm = load_model(model, seed=0)
    inputs = example_inputs(lm, batch=2, seq=8)
    W0 = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    names = attach(lm.model, LoraConfig(r=4, alpha=8.0, targets="attn"))
    assert names == [f"{n}.weight" for n in resolve_targets(load_model(model).model, "attn")]
    assert all(n in W0 for n in names)      # base names unchanged by attach
    assert {id(p) for p in trainable_parameters(lm.model)} == {
        id(p) for n, p in lm.model.named_parameters() if p.requires_grad}
    _train(lm, inputs)
    adapter = extract(lm.model)
    assert adapter.method == "lora"
    assert adapter.weight_sha256 == {n: weight_sha256(W0[n].numpy()) for n in names}
    fresh = load_model(model, seed=0)
    apply_adapter_torch(fresh.model, adapter)
    with torch.no_grad():
        torch.testing.assert_close(forward(fresh, inputs), forward(lm, inputs),
                                   rtol=1e-4, atol=1e-5)
    for n, p in fresh.model.named_parameters():
        if n in adapter.targets:
            d = adapter.targets[n]
            torch.testing.assert_close(p.detach(), W0[n] + torch.from_numpy(d.B @ d.A))
        else:
            assert torch.equal(p, W0[n]), n


def test_checkpoint_round_trip_and_mismatch():
    lm = load_model("tiny-smollm2", seed=3)
    inputs = example_inputs(lm, batch=1, seq=6)
    config = LoraConfig(r=2)
    attach(lm.model, config)
    _train(lm, inputs, steps=1)
    state = adapter_state(lm.model)
    fresh = load_model("tiny-smollm2", seed=3)
    load_adapter_state(fresh.model, config, state)
    with torch.no_grad():
        torch.testing.assert_close(forward(fresh, inputs), forward(lm, inputs), rtol=0, atol=0)
    with pytest.raises(AdapterFormatError, match="shape"):
        load_adapter_state(load_model("tiny-smollm2").model, LoraConfig(r=3), state)
    with pytest.raises(AdapterFormatError, match="missing"):
        load_adapter_state(load_model("tiny-smollm2").model, LoraConfig(r=2, targets="attn"),
                           state)


@pytest.mark.parametrize("config", [LoraConfig(r=3, alpha=5.0, targets="attn"),
                                    ShiraConfig(mask="struct", budget_rank=2, struct_axis="col"),
                                    SoraConfig(r_max=6, xi=1e-3, gate_init="ones"),
                                    SiraConfig(num_experts=3, top_k=1, capacity_factor=2.0)])
def test_config_dict_round_trip(config):
    d = config.to_dict()
    assert d["method"] == config.method
    assert config_from_dict(d) == config
    assert set(type(config).help()) == set(d) - {"method"}
    assert all(type(config).help().values())


def test_bad_input():
    with pytest.raises(UnknownNameError):
        config_from_dict({"method": "dora"})
    with pytest.raises(ConfigError, match="unknown config field"):
        config_from_dict({"method": "lora", "rank": 4})
    for kwargs in ({"r": 0}, {"alpha": 0}, {"dropout": 1.0}, {"targets": ""}):
        with pytest.raises(ConfigError):
            LoraConfig(**kwargs)
    for bad in (math.nan, math.inf, -math.inf, True):  # NaN/inf would train a NaN adapter
        with pytest.raises(ConfigError, match="alpha"):
            LoraConfig(alpha=bad)
    with pytest.raises(ConfigError, match="dropout"):
        LoraConfig(dropout=math.nan)
    lm = load_model("tiny-smollm2")
    attach(lm.model, LoraConfig())
    with pytest.raises(ConfigError, match="already"):
        attach(lm.model, LoraConfig())
    with pytest.raises(ConfigError, match="no adapter"):
        extract(load_model("tiny-smollm2").model)
    adapter = extract(lm.model)
    with pytest.raises(TargetMismatchError):
        apply_adapter_torch(load_model("tiny-minilm").model, adapter)
    assert set(CONFIGS) == {"lora", "shira", "sora", "sira"}
