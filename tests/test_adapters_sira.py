"""SiRA: routing and capacity against a loop-by-loop reference, dropout, aux loss, export."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from edgeadapt.adapters import (
    SiraConfig,
    SiraLinear,
    apply_adapter_torch,
    attach,
    extract,
    sira_aux_loss,
    trainable_parameters,
)
from edgeadapt.adapters.sira import expert_capacity, route
from edgeadapt.errors import ConfigError
from edgeadapt.models import example_inputs, forward, load_model

torch.set_num_threads(1)


def reference_gates(probs: torch.Tensor, top_k: int, capacity_factor: float) -> torch.Tensor:
    """Slow reference, one token at a time: 1st choices of all tokens in order, then 2nd, ..."""
    T, E = probs.shape
    capacity = math.ceil(capacity_factor * top_k * T / E)
    choices = []
    for t in range(T):
        order = sorted(range(E), key=lambda e: -float(probs[t, e]))[:top_k]
        total = sum(float(probs[t, e]) for e in order)
        choices.append([(e, float(probs[t, e]) / total) for e in order])
    used = [0] * E
    gates = torch.zeros(T, E, dtype=torch.float64)
    for j in range(top_k):
        for t in range(T):
            e, w = choices[t][j]
            if used[e] < capacity:
                used[e] += 1
                gates[t, e] = w
    return gates


def reference_layer(layer: SiraLinear, x: torch.Tensor) -> torch.Tensor:
    x2d = x.reshape(-1, layer.in_features).double()
    probs = torch.softmax(x2d @ layer.sira_router.detach().double().T, -1)
    gates = reference_gates(probs, layer.top_k, layer.capacity_factor)
    out = []
    for t in range(x2d.shape[0]):
        y = layer.weight.double() @ x2d[t] + layer.bias.double()
        for e in range(layer.num_experts):
            if gates[t, e] != 0:
                A, B = layer.sira_A[e].double(), layer.sira_B[e].double()
                y = y + gates[t, e] * layer.scaling * (B @ (A @ x2d[t]))
        out.append(y)
    return torch.stack(out).reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("T,E,k,cf", [(13, 4, 2, 1.0), (20, 5, 1, 0.5), (9, 3, 3, 0.7),
                                      (16, 4, 2, 2.0), (7, 6, 2, 0.25)])
def test_route_matches_loop_reference_and_respects_capacity(T, E, k, cf):
    torch.manual_seed(T * E)
    probs = torch.softmax(torch.randn(T, E, dtype=torch.float64) * 2, -1)
    capacity = expert_capacity(cf, k, T, E)
    gates = route(probs, k, capacity)
    ref = reference_gates(probs, k, cf)
    assert torch.equal(gates != 0, ref != 0)
    torch.testing.assert_close(gates, ref, rtol=1e-12, atol=1e-12)
    assert int((gates != 0).sum(0).max()) <= capacity
    assert torch.all((gates != 0).sum(1) <= k)
    if cf >= E / k:   # capacity >= T: nothing is dropped, each token's weights sum to 1
        torch.testing.assert_close(gates.sum(1), torch.ones(T, dtype=torch.float64))


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 24), E=st.integers(1, 6), data=st.data())
def test_route_property_matches_reference(T, E, data):
    k = data.draw(st.integers(1, E))
    cf = data.draw(st.floats(0.05, 3.0))
    seed = data.draw(st.integers(0, 2**16))
    probs = torch.softmax(torch.randn(T, E, dtype=torch.float64,
                                      generator=torch.Generator().manual_seed(seed)), -1)
    gates = route(probs, k, expert_capacity(cf, k, T, E))
    torch.testing.assert_close(gates, reference_gates(probs, k, cf), rtol=1e-12, atol=1e-12)
    assert int((gates != 0).sum(0).max()) <= expert_capacity(cf, k, T, E)


def test_zero_probabilities_are_never_routed():
    probs = torch.tensor([[0.0, 0.5, 0.25, 0.0], [0.0, 0.0, 0.0, 2.0]], dtype=torch.float64)
    gates = route(probs, 2, capacity=10)
    assert gates.tolist() == [[0.0, 2 / 3, 1 / 3, 0.0], [0.0, 0.0, 0.0, 1.0]]


def _layer(E=4, r=3, k=2, cf=1.0, p=0.0, seed=0):
    torch.manual_seed(seed)
    layer = SiraLinear(nn.Linear(10, 6), E, r, alpha=6.0, top_k=k, capacity_factor=cf,
                       expert_dropout=p, aux_loss_weight=0.1)
    with torch.no_grad():
        layer.sira_B.normal_()
        layer.sira_router.mul_(5)   # sharper routing, uneven loads, some capacity drops
    return layer


@pytest.mark.parametrize("E,k,cf", [(4, 2, 1.0), (4, 1, 0.5), (3, 3, 1.25)])
def test_layer_matches_loop_reference(E, k, cf):
    layer = _layer(E=E, k=k, cf=cf).eval()
    x = torch.randn(2, 7, 10)
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), reference_layer(layer, x),
                                   rtol=1e-4, atol=1e-5)
        probs = torch.softmax(x.reshape(-1, 10).double() @ layer.sira_router.double().T, -1)
    if cf < 1:   # capacity below the demand: the reference must have dropped assignments
        assert int((reference_gates(probs, k, cf) != 0).sum()) < 14 * k


def test_expert_dropout_only_in_training_and_aux_loss():
    layer = _layer(p=0.5)
    x = torch.randn(4, 8, 10)
    layer.eval()
    eval_out = layer(x)
    torch.testing.assert_close(eval_out.double(), reference_layer(layer, x), rtol=1e-4, atol=1e-5)
    assert layer.aux_loss is None
    layer.train()
    torch.manual_seed(1)
    a = layer(x)
    torch.manual_seed(2)
    b = layer(x)
    assert not torch.allclose(a, b) and not torch.allclose(a, eval_out)
    # Switch aux loss by hand: E * sum_e (fraction of first choices on e) * (mean prob of e)
    probs = torch.softmax(x.reshape(-1, 10) @ layer.sira_router.T, -1)
    first = torch.bincount(probs.argmax(-1), minlength=4).float() / probs.shape[0]
    torch.testing.assert_close(layer.aux_loss, 4 * (first * probs.mean(0)).sum())
    holder = nn.Sequential(layer)
    torch.testing.assert_close(sira_aux_loss(holder), 0.1 * layer.aux_loss)


def test_attach_train_extract_apply_parity():
    lm = load_model("tiny-minilm", seed=0)
    inputs = example_inputs(lm, batch=2, seq=8)
    with torch.no_grad():
        base_out = forward(lm, inputs)
    attach(lm.model, SiraConfig(num_experts=3, r=2, top_k=2, capacity_factor=1.0,
                                expert_dropout=0.1))
    opt = torch.optim.Adam(trainable_parameters(lm.model), lr=1e-2)
    lm.model.train()
    for _ in range(3):
        opt.zero_grad()
        loss = forward(lm, inputs).logsumexp(-1).mean() + sira_aux_loss(lm.model)
        loss.backward()
        opt.step()
    lm.model.eval()
    adapter = extract(lm.model)
    branch = next(iter(adapter.targets.values()))
    assert adapter.method == "sira" and branch.num_experts == 3 and branch.top_k == 2
    fresh = load_model("tiny-minilm", seed=0)
    apply_adapter_torch(fresh.model, adapter)
    with torch.no_grad():
        torch.testing.assert_close(forward(fresh, inputs), forward(lm, inputs),
                                   rtol=1e-5, atol=1e-6)
        half = load_model("tiny-minilm", seed=0)
        apply_adapter_torch(half.model, adapter, scale=0.0)
        torch.testing.assert_close(forward(half, inputs), base_out)


def test_layer_exports_with_static_shapes():
    layer = _layer(E=4, k=2, cf=1.0).eval()
    x = torch.randn(2, 7, 10)
    program = torch.export.export(layer, (x,))
    torch.testing.assert_close(program.module()(x), layer(x))
    x2 = torch.randn(2, 7, 10) * 3
    torch.testing.assert_close(program.module()(x2), layer(x2))
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("nonzero" in o or "masked_select" in o or "index_put" in o for o in ops)


def test_bad_configs():
    for kwargs in ({"top_k": 0}, {"top_k": 5, "num_experts": 4}, {"capacity_factor": 0.0},
                   {"capacity_factor": -1.0}, {"num_experts": 0}, {"expert_dropout": 1.0},
                   {"aux_loss_weight": -0.1}, {"r": 0}):
        with pytest.raises(ConfigError):
            SiraConfig(**kwargs)
    for name in ("alpha", "capacity_factor", "aux_loss_weight"):  # finite numbers only
        for bad in (math.nan, math.inf, -math.inf):
            with pytest.raises(ConfigError, match=name):
                SiraConfig(**{name: bad})


def test_whole_model_with_sira_exports():
    from edgeadapt.models import LogitsModule

    lm = load_model("tiny-smollm2", seed=0)
    inputs = example_inputs(lm, batch=2, seq=8)
    attach(lm.model, SiraConfig(targets="attn", capacity_factor=0.75))
    for layer in (m for m in lm.model.modules() if isinstance(m, SiraLinear)):
        with torch.no_grad():
            layer.sira_B.normal_(std=0.1)
    module = LogitsModule(lm).eval()
    program = torch.export.export(module, (), inputs)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(**inputs), module(**inputs))


def test_layer_runs_in_onnx_runtime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    layer = _layer(E=4, k=2, cf=0.75).eval()
    x = torch.randn(2, 7, 10)
    path = tmp_path / "sira.onnx"
    torch.onnx.export(layer, (x,), str(path), dynamo=True, verbose=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), layer(x), rtol=1e-5, atol=1e-5)
