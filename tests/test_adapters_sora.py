"""SoRA: gated formula, proximal step, pruning equivalence, gate bookkeeping, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from edgeadapt.adapters import (
    SoraConfig,
    SoraLinear,
    adapter_state,
    apply_adapter_torch,
    attach,
    extract,
    gate_parameters,
    live_ranks,
    load_adapter_state,
    prune_sora,
    sora_l1,
    sora_proximal_step,
    trainable_parameters,
)
from edgeadapt.errors import ConfigError
from edgeadapt.models import example_inputs, forward, load_model

torch.set_num_threads(1)


def test_layer_formula_by_hand():
    torch.manual_seed(0)
    base = nn.Linear(7, 5)
    layer = SoraLinear(base, r_max=4, alpha=2.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 7)
    A, B, g = layer.lora_A.detach(), layer.lora_B.detach(), layer.sora_gate.detach()
    expected = base(x) + ((x @ A.T) * g) @ B.T * 0.5
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    assert SoraLinear(nn.Linear(7, 5), 3, 1.0, gate_init="ones").sora_gate.tolist() == [1.0] * 3


def test_proximal_step_soft_thresholds_to_exact_zeros():
    lm = load_model("tiny-smollm2")
    attach(lm.model, SoraConfig(r_max=4))
    gates = gate_parameters(lm.model)
    with torch.no_grad():
        gates[0].copy_(torch.tensor([0.5, -0.2, 0.05, -0.1]))
    sora_proximal_step(lm.model, 0.1)
    assert gates[0].tolist() == pytest.approx([0.4, -0.1, 0.0, 0.0])
    assert (gates[0] == 0).tolist() == [False, False, True, True]
    assert live_ranks(lm.model)[next(iter(live_ranks(lm.model)))] == 2
    with pytest.raises(ConfigError):
        sora_proximal_step(lm.model, -1.0)


def test_gates_are_kept_out_of_the_main_group_and_l1():
    lm = load_model("tiny-minilm")
    attach(lm.model, SoraConfig(r_max=3))
    main = {id(p) for p in trainable_parameters(lm.model)}
    gates = gate_parameters(lm.model)
    assert gates and all(id(g) not in main for g in gates)
    assert all(g.requires_grad for g in gates)
    torch.testing.assert_close(sora_l1(lm.model), sum(g.abs().sum() for g in gates))


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_prune_sora_pure_function(lib):
    rng = np.random.default_rng(0)
    A, B = rng.normal(size=(5, 6)), rng.normal(size=(4, 5))
    g = np.array([0.3, 0.0, -1.2, 0.0, 0.7])
    if lib == "torch":
        A, B, g = (torch.from_numpy(a) for a in (A, B, g))
    A2, B2 = prune_sora(A, B, g, 0.25)
    assert A2.shape == (3, 6) and B2.shape == (4, 3)
    full = (B * g) @ A * 0.25
    np.testing.assert_allclose(np.asarray(B2 @ A2), np.asarray(full), rtol=1e-12)
    np.testing.assert_array_equal(np.asarray(A2), np.asarray(A)[[0, 2, 4]])


def test_pruned_lora_matches_gated_model_and_drops_exactly_zero_ranks():
    torch.manual_seed(0)
    lm = load_model("tiny-smollm2", seed=0)
    inputs = example_inputs(lm, batch=2, seq=8)
    config = SoraConfig(r_max=8, alpha=8.0, targets="attn")
    names = attach(lm.model, config)
    opt = torch.optim.Adam(trainable_parameters(lm.model) + gate_parameters(lm.model), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        forward(lm, inputs).logsumexp(-1).mean().backward()
        opt.step()
    sora_proximal_step(lm.model, 0.8)   # randn gates: kills roughly half the ranks
    ranks = live_ranks(lm.model)
    assert 0 < sum(ranks.values()) < 8 * len(ranks)
    adapter = extract(lm.model)
    assert adapter.method == "sora" and sorted(adapter.targets) == sorted(names)
    for name, layer in ((n, lm.model.get_submodule(n)) for n in ranks):
        delta = adapter.targets[f"{name}.weight"]
        keep = (layer.sora_gate != 0).numpy()
        assert delta.rank == ranks[name] == keep.sum()
        np.testing.assert_array_equal(delta.A, layer.lora_A.detach().numpy()[keep])
    fresh = load_model("tiny-smollm2", seed=0)
    apply_adapter_torch(fresh.model, adapter)
    with torch.no_grad():
        torch.testing.assert_close(forward(fresh, inputs), forward(lm, inputs),
                                   rtol=1e-4, atol=1e-5)
    # checkpoints keep the gates, zeros included
    again = load_model("tiny-smollm2", seed=0)
    load_adapter_state(again.model, config, adapter_state(lm.model))
    assert live_ranks(again.model) == ranks


def test_bad_configs():
    for kwargs in ({"r_max": 0}, {"xi": -1e-4}, {"l1": -1.0}, {"gate_init": "zeros"},
                   {"alpha": -1.0}):
        with pytest.raises(ConfigError):
            SoraConfig(**kwargs)
    for name in ("alpha", "xi", "l1"):  # finite numbers only
        for bad in (math.nan, math.inf, -math.inf):
            with pytest.raises(ConfigError, match=name):
                SoraConfig(**{name: bad})
