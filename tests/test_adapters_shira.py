"""SHiRA: exact sparse math and gradients, mask definitions, fused application, checkpoints."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from edgeadapt.adapters import (
    MASK_KINDS,
    LoraConfig,
    ShiraConfig,
    ShiraLinear,
    adapter_state,
    apply_adapter_torch,
    attach,
    config_from_dict,
    extract,
    load_adapter_state,
    trainable_parameters,
)
from edgeadapt.adapters.shira.masks import mask_budget, select_mask
from edgeadapt.errors import AdapterFormatError, ConfigError, UnknownNameError
from edgeadapt.models import example_inputs, forward, load_model

torch.set_num_threads(1)


def _loss(lm, inputs):
    return forward(lm, inputs).logsumexp(-1).mean()


def _train(lm, inputs, steps=3, lr=1e-2):
    opt = torch.optim.Adam(trainable_parameters(lm.model), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        _loss(lm, inputs).backward()
        opt.step()


def _base_weights(lm):
    return {n: p.detach().clone() for n, p in lm.model.named_parameters()}


# --- the layer: outputs and gradients against a dense autograd reference -----------------------

@pytest.mark.parametrize("bias", [True, False])
def test_layer_matches_dense_reference_outputs_and_gradients(bias):
    torch.manual_seed(0)
    out_f, in_f, k = 11, 13, 40
    base = nn.Linear(in_f, out_f, bias=bias)
    W0 = base.weight.detach().clone()
    idx = torch.randperm(out_f * in_f)[:k].sort().values
    layer = ShiraLinear(base, idx)
    with torch.no_grad():
        layer.shira_values.normal_()
    x = torch.randn(3, 5, in_f, requires_grad=True)
    upstream = torch.randn(3, 5, out_f)
    (layer(x) * upstream).sum().backward()

    # dense reference: W = W0 + scatter(values), differentiated by plain autograd
    W = (W0.reshape(-1).clone().index_put((idx,), W0.reshape(-1)[idx]
                                          + layer.shira_values.detach())).reshape(out_f, in_f)
    W.requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = F.linear(x_ref, W, base.bias.detach() if bias else None)
    (y_ref * upstream).sum().backward()

    torch.testing.assert_close(layer(x).detach(), y_ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.shira_values.grad, W.grad.reshape(-1)[idx],
                               rtol=1e-5, atol=1e-5)
    # the base is trainable here (plain nn.Linear), so its dense gradient must match too
    torch.testing.assert_close(base.weight.grad, W.grad, rtol=1e-5, atol=1e-5)


def test_layer_starts_at_base_and_never_writes_base_weight():
    torch.manual_seed(1)
    base = nn.Linear(8, 6)
    base.weight.requires_grad_(False)
    W0 = base.weight.detach().clone()
    layer = ShiraLinear(base, torch.tensor([0, 5, 17, 47]))
    x = torch.randn(4, 8)
    torch.testing.assert_close(layer(x), F.linear(x, W0, base.bias), rtol=0, atol=1e-6)
    opt = torch.optim.SGD([layer.shira_values], lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        layer(x).pow(2).sum().backward()
        opt.step()
    assert torch.equal(base.weight, W0)
    assert layer.shira_values.abs().min() > 0


def test_fused_training_restores_base_bit_for_bit():
    # values so large that (w + v) - v != w in float32: only an exact restore passes
    torch.manual_seed(2)
    base = nn.Linear(9, 7)
    base.weight.requires_grad_(False)
    W0 = base.weight.detach().clone()
    idx = torch.tensor([1, 8, 20, 62])
    layer = ShiraLinear(base, idx)
    with torch.no_grad():
        layer.shira_values.copy_(torch.tensor([1e8, -3e7, 0.1234567, 7.0]))
    x = torch.randn(5, 9, requires_grad=True)
    layer(x).sum().backward()
    assert torch.equal(base.weight, W0)
    with torch.inference_mode():
        y = layer(x.detach())
    assert torch.equal(base.weight, W0)
    dense = W0.reshape(-1).clone()
    dense[idx] += layer.shira_values.detach()
    torch.testing.assert_close(y, F.linear(x.detach(), dense.reshape(7, 9), base.bias))
    assert x.grad is not None and layer.shira_values.grad is not None


# --- mask definitions ---------------------------------------------------------------------------

def _mask_of(lm, name):
    return lm.model.get_submodule(name).shira_indices


def _reference_grads(lm, inputs, names):
    weights = [lm.model.get_submodule(n).weight for n in names]
    for w in weights:
        w.requires_grad_(True)
    grads = torch.autograd.grad(_loss(lm, inputs), weights)
    for w in weights:
        w.requires_grad_(False)
    return dict(zip(names, grads, strict=True))


def _assert_top_k(score, idx):
    flat = score.reshape(-1)
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    chosen[idx] = True
    assert flat[chosen].min() >= flat[~chosen].max()


@pytest.mark.parametrize("kind", ["wm", "grad", "snip"])
def test_score_masks_pick_the_top_k_of_their_score(kind):
    lm = load_model("tiny-smollm2", seed=0)
    inputs = example_inputs(lm, batch=2, seq=8)
    names = [n.removesuffix(".weight") for n in
             ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight")]
    grads = _reference_grads(lm, inputs, names)
    weights = {n: lm.model.get_submodule(n).weight.detach().clone() for n in names}
    attach(lm.model, ShiraConfig(mask=kind, density=0.05), calib=lambda: _loss(lm, inputs))
    for n in names:
        idx = _mask_of(lm, n)
        assert idx.numel() == round(0.05 * weights[n].numel())
        assert torch.all(idx[1:] > idx[:-1])
        score = {"wm": weights[n].abs(), "grad": grads[n].abs(),
                 "snip": (weights[n] * grads[n]).abs()}[kind]
        _assert_top_k(score, idx)


def test_random_mask_exact_k_and_reproducible_by_seed():
    shape = (24, 40)
    w = torch.randn(shape)
    a = select_mask("random", w, 50, seed=3)
    b = select_mask("random", w, 50, seed=3)
    c = select_mask("random", w, 50, seed=4)
    assert a.numel() == 50 and torch.unique(a).numel() == 50
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() < 24 * 40


@pytest.mark.parametrize("shape,k,axis", [((24, 40), 200, "row"), ((24, 40), 200, "col"),
                                          ((40, 24), 100, "row"), ((64, 64), 64 * 2 * 4, "row")])
def test_struct_mask_is_every_fth_line_plus_diagonal_closest_to_budget(shape, k, axis):
    out_f, in_f = shape
    idx = select_mask("struct", torch.randn(shape), k, axis=axis)

    i, j = torch.arange(out_f)[:, None], torch.arange(in_f)[None, :]

    def pattern(f):
        line = i if axis == "row" else j
        return (line % f == 0) | (i == j)

    lines = out_f if axis == "row" else in_f
    candidates = {f: pattern(f) for f in range(1, lines + 1)}
    got = torch.zeros(shape, dtype=torch.bool).reshape(-1)
    got[idx] = True
    matches = [f for f, m in candidates.items() if torch.equal(m.reshape(-1), got)]
    assert matches, "mask is not a row/column stride pattern plus the diagonal"
    best = min(abs(int(m.sum()) - k) for m in candidates.values())
    assert abs(idx.numel() - k) == best


def test_budget_rank_equals_lora_parameter_count():
    lm_s, lm_l = load_model("tiny-smollm2"), load_model("tiny-smollm2")
    attach(lm_s.model, ShiraConfig(budget_rank=3, targets="attn"))
    attach(lm_l.model, LoraConfig(r=3, targets="attn"))
    count = lambda m: sum(p.numel() for p in trainable_parameters(m))  # noqa: E731
    assert count(lm_s.model) == count(lm_l.model) > 0
    assert mask_budget((64, 32), 0.01, None) == round(0.01 * 64 * 32)
    assert mask_budget((4, 4), 0.01, None) == 1
    assert mask_budget((4, 4), 0.5, 3) == 16


# --- training, extraction, application ----------------------------------------------------------

@pytest.mark.parametrize("kind", MASK_KINDS)
def test_applied_adapter_changes_exactly_the_masked_entries(kind):
    lm = load_model("tiny-smollm2", seed=1)
    inputs = example_inputs(lm, batch=2, seq=8, seed=1)
    W0 = _base_weights(lm)
    names = attach(lm.model, ShiraConfig(mask=kind, density=0.05, targets="attn"),
                   calib=lambda: _loss(lm, inputs))
    assert all(not p.requires_grad for n, p in lm.model.named_parameters()
               if not n.endswith("shira_values"))
    assert all(p.dim() == 1 for p in trainable_parameters(lm.model))
    _train(lm, inputs)
    assert all(torch.equal(p, W0[n]) for n, p in lm.model.named_parameters() if n in W0)
    with torch.no_grad():
        adapted_out = forward(lm, inputs)
    adapter = extract(lm.model)
    assert adapter.method == "shira" and sorted(adapter.targets) == sorted(names)

    fresh = load_model("tiny-smollm2", seed=1)
    apply_adapter_torch(fresh.model, adapter)
    for n, p in fresh.model.named_parameters():
        changed = (p != W0[n]).reshape(-1).nonzero().reshape(-1)
        if n not in adapter.targets:
            assert changed.numel() == 0, n
            continue
        delta = adapter.targets[n]
        idx = torch.from_numpy(delta.indices)
        nonzero = idx[torch.from_numpy(delta.values) != 0]
        assert nonzero.numel() > 0.9 * idx.numel()
        assert torch.equal(changed, nonzero), n
        expected = W0[n].reshape(-1)[idx] + torch.from_numpy(delta.values)
        assert torch.equal(p.detach().reshape(-1)[idx], expected)
    with torch.no_grad():
        torch.testing.assert_close(forward(fresh, inputs), adapted_out, rtol=1e-4, atol=1e-5)


def test_scale_and_weight_hashes():
    lm = load_model("tiny-minilm")
    inputs = example_inputs(lm)
    attach(lm.model, ShiraConfig(density=0.1))
    _train(lm, inputs, steps=1)
    hashes = {n: "ab" * 32 for n in
              [f"{m}.weight" for m, _ in lm.model.named_modules() if hasattr(_, "shira_values")]}
    adapter = extract(lm.model, weight_sha256=hashes)
    assert adapter.weight_sha256 == hashes
    fresh = load_model("tiny-minilm")
    W0 = _base_weights(fresh)
    apply_adapter_torch(fresh.model, adapter, scale=0.5)
    name, delta = next(iter(adapter.targets.items()))
    got = fresh.model.get_parameter(name).detach().reshape(-1)[torch.from_numpy(delta.indices)]
    want = W0[name].reshape(-1)[torch.from_numpy(delta.indices)] + 0.5 * torch.from_numpy(
        delta.values)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)


def test_checkpoint_round_trip_keeps_masks_and_values():
    lm = load_model("tiny-smollm2", seed=2)
    inputs = example_inputs(lm, batch=2, seq=8)
    config = ShiraConfig(mask="snip", density=0.03)
    attach(lm.model, config, calib=lambda: _loss(lm, inputs))
    _train(lm, inputs, steps=2)
    state = adapter_state(lm.model)
    assert any(k.endswith("shira_indices") for k in state)
    fresh = load_model("tiny-smollm2", seed=2)
    load_adapter_state(fresh.model, config, state)   # no calib needed: masks come from state
    with torch.no_grad():
        torch.testing.assert_close(forward(fresh, inputs), forward(lm, inputs), rtol=0, atol=0)
    for k, v in adapter_state(fresh.model).items():
        assert torch.equal(v, state[k])
    key = next(k for k in state if k.endswith("shira_indices"))
    # float indices (exact or fractional) are refused, not floored to other positions
    for bad in (state[key].flip(0), state[key] + 10**6, state[key][:0], state[key].double(),
                state[key].double() + 0.5):
        with pytest.raises(AdapterFormatError, match="indices"):
            load_adapter_state(load_model("tiny-smollm2").model, config, {**state, key: bad})


def test_bad_configs_are_config_errors():
    for bad in (0.0, -0.1, 1.5, math.nan):
        with pytest.raises(ConfigError, match="density"):
            ShiraConfig(density=bad)
    with pytest.raises(UnknownNameError, match="mask kind"):
        ShiraConfig(mask="magnitude")
    with pytest.raises(ConfigError, match="budget_rank"):
        ShiraConfig(budget_rank=0)
    lm = load_model("tiny-smollm2")
    with pytest.raises(ConfigError, match="calib"):
        attach(lm.model, ShiraConfig(mask="grad"))
    with pytest.raises(ConfigError, match="matches no"):
        attach(load_model("tiny-smollm2").model, ShiraConfig(targets="nonexistent_xyz"))


@pytest.mark.parametrize("kind", ["random", "wm", "grad", "snip"])
def test_excluded_positions_are_avoided_and_the_rest_is_top_k(kind):
    """exclude: the mask is disjoint from it, has K entries, and for scored kinds is the top-K
    of the score among the allowed entries (hand reference: score with excluded set to -inf)."""
    gen = torch.Generator().manual_seed(0)
    w, g = torch.randn(20, 30, generator=gen), torch.randn(20, 30, generator=gen)
    first = select_mask(kind, w, 60, grad=g, seed=1)
    second = select_mask(kind, w, 60, grad=g, seed=1, exclude=first)
    assert second.numel() == 60 and torch.all(second[1:] > second[:-1])
    assert not set(first.tolist()) & set(second.tolist())
    if kind != "random":
        score = {"wm": w.abs(), "grad": g.abs(), "snip": (w * g).abs()}[kind].reshape(-1).clone()
        score[first] = -math.inf
        assert set(second.tolist()) == set(torch.topk(score, 60).indices.tolist())
    with pytest.raises(ConfigError, match="fit"):
        select_mask(kind, w, 600 - 59, grad=g, exclude=first)
    with pytest.raises(ConfigError, match="struct"):
        select_mask("struct", w, 60, exclude=first)


def _shira_run(path, model="tiny-smollm2", seed=0, config=None):
    """A run directory as the trainer writes it (save_run); returns module -> its indices."""
    from edgeadapt.train.run import base_weight_hashes, save_run

    lm = load_model(model, seed=seed)
    config = config or ShiraConfig(mask="wm", density=0.1)
    weights = attach(lm.model, config)
    info = {"method": config.method, "config": config.to_dict(), "model": model,
            "weight_sha256": base_weight_hashes(lm, weights), "seed": seed}
    save_run(path, lm, info, adapter_state(lm.model), {})
    return {w.removesuffix(".weight"): getattr(lm.model.get_submodule(w.removesuffix(".weight")),
                                               "shira_indices", None) for w in weights}


def test_exclude_run_reads_another_runs_positions(tmp_path):
    from edgeadapt.adapters.shira.model import choose_masks
    from edgeadapt.train import excluded_positions

    first = _shira_run(tmp_path / "run")
    names = sorted(first)
    lm = load_model("tiny-smollm2", seed=0)
    run = str(tmp_path / "run")
    second = choose_masks(lm.model, names, ShiraConfig(
        mask="wm", density=0.1, exclude=excluded_positions(run, lm.model), exclude_run=run))
    for n in names:
        assert second[n].numel() == first[n].numel()
        assert not set(first[n].tolist()) & set(second[n].tolist())
    with pytest.raises(ConfigError, match="not a training run"):
        excluded_positions(str(tmp_path / "nope"), lm.model)
    # the config never reads a run: a recorded exclude_run without the positions is refused
    with pytest.raises(ConfigError, match="only records"):
        choose_masks(lm.model, names, ShiraConfig(exclude_run=run))


def test_exclude_holds_positions_and_adapter_json_records_their_run():
    """exclude: sorted distinct ints per module (any 1-D integer sequence in), checked against
    the weight; to_dict keeps hand-given positions (round trip) but writes only the run they
    were read from (a run's positions live in its own adapter.safetensors)."""
    from edgeadapt.adapters.shira.model import choose_masks

    config = ShiraConfig(mask="wm", density=0.1, exclude={"a": np.array([5, 1, 5, 3])})
    assert config.exclude == {"a": (1, 3, 5)}
    assert config_from_dict(config.to_dict()) == config
    recorded = ShiraConfig(exclude={"a": [1]}, exclude_run="runs/rt").to_dict()
    assert recorded["exclude"] is None and recorded["exclude_run"] == "runs/rt"
    for bad in ([1.5], [[1, 2]], [-1], "x"):
        with pytest.raises(ConfigError, match="exclude"):
            ShiraConfig(exclude={"a": bad})
    with pytest.raises(ConfigError, match="exclude"):
        ShiraConfig(exclude=[1, 2])
    lm = load_model("tiny-smollm2")
    name = "model.layers.0.self_attn.q_proj"
    size = lm.model.get_submodule(name).weight.numel()
    masks = choose_masks(lm.model, [name], ShiraConfig(mask="wm", density=0.1,
                                                       exclude={name: range(0, size, 2)}))
    assert masks[name].numel() and bool((masks[name] % 2 == 1).all())
    with pytest.raises(ConfigError, match="inside"):
        choose_masks(lm.model, [name], ShiraConfig(exclude={name: [size]}))


def test_exclude_run_is_refused_unless_it_is_a_valid_shira_run_of_this_base(tmp_path):
    """Another base (other architecture or other weights), another method, a run sharing no
    target, a truncated file, out-of-range or float indices: typed errors, nothing excluded
    silently (before: SafetensorError / IndexError, or exit 0 having excluded nothing)."""
    from safetensors.torch import load_file, save_file

    from edgeadapt.adapters.shira.model import choose_masks
    from edgeadapt.errors import FingerprintMismatchError
    from edgeadapt.train import excluded_positions

    run = tmp_path / "run"
    names = sorted(_shira_run(run))
    smol = load_model("tiny-smollm2", seed=0).model

    def masks(model=smol, targets=names, where=run):
        return choose_masks(model, targets, ShiraConfig(
            exclude=excluded_positions(str(where), model), exclude_run=str(where)))

    minilm = load_model("tiny-minilm").model
    with pytest.raises(FingerprintMismatchError, match="not in this base model"):
        masks(minilm, ["bert.encoder.layer.0.attention.self.query"])
    with pytest.raises(FingerprintMismatchError, match="differs"):
        masks(load_model("tiny-smollm2", seed=1).model)
    with pytest.raises(ConfigError, match="none of this adapter's targets"):
        masks(targets=["model.layers.0.self_attn.k_proj"])
    _shira_run(tmp_path / "lora", config=LoraConfig(r=2))
    with pytest.raises(ConfigError, match="not a SHiRA run"):
        masks(where=tmp_path / "lora")

    file = run / "adapter.safetensors"
    good = file.read_bytes()
    state = {k: v.clone() for k, v in load_file(file).items()}  # not mmapped: file changes
    key = next(k for k in sorted(state) if k.endswith("shira_indices"))
    file.write_bytes(good[: len(good) // 2])
    with pytest.raises(AdapterFormatError, match="adapter.safetensors"):
        masks()
    for bad, needle in ((state[key] + 10**9, "inside"), (state[key].double() + 0.5, "integer")):
        save_file({**state, key: bad}, file)
        with pytest.raises(AdapterFormatError, match=needle):
            masks()
    file.write_bytes(good)
    assert masks()  # restored: accepted again
