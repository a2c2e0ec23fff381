"""The PyTorch model carrying adapters (edgeadapt.adapters.reference) against numpy references:
weights W0 + sum_i s_i dW_i, the first adapter's head winning, and the model left bit for bit
as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeadapt.adapters.reference import (
    carrying,
    reference_logits,
    reference_model,
    reference_weights,
)
from edgeadapt.bench.synth import synth_lora, synth_shira, synth_sira
from edgeadapt.format.types import Adapter
from edgeadapt.models import example_inputs, forward, head_weight_names, load_model
from edgeadapt.models import target_weight_names as twn


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    lm = load_model("tiny-minilm", num_labels=2, seed=0)
    names = twn(lm.model, "qv")
    shapes = {n: tuple(lm.model.get_parameter(n).shape) for n in names}
    sha = {n: "0" * 64 for n in names}
    return lm, names, shapes, sha


def _state(lm) -> dict[str, np.ndarray]:
    return {n: t.detach().numpy().copy() for n, t in lm.model.state_dict().items()}


def test_weights_are_w0_plus_scaled_deltas(tiny):
    lm, names, shapes, sha = tiny
    before = _state(lm)
    s, lo = synth_shira(shapes, sha, density=0.05, seed=1), synth_lora(shapes, sha, rank=2)
    got = reference_weights(lm, [s, lo], names, scales=[0.5, 2.0])
    for n in names:
        want = before[n].astype(np.float64).ravel()
        want[s.targets[n].indices] += 0.5 * s.targets[n].values
        want = want.reshape(before[n].shape) + 2.0 * lo.targets[n].B @ lo.targets[n].A
        np.testing.assert_allclose(got[n], want, rtol=0, atol=1e-5)
    after = _state(lm)
    assert all(np.array_equal(after[k], v) for k, v in before.items())  # restored exactly


def test_first_adapters_head_wins_and_copy_leaves_model(tiny):
    lm, names, shapes, sha = tiny
    head = head_weight_names(lm.model, lm.kind)
    w = {n: lm.model.get_parameter(n).detach().numpy() for n in head}
    a = Adapter("shira", {}, {}, {}, head={n: np.full_like(v, 1.0) for n, v in w.items()})
    b = Adapter("shira", {}, {}, {}, head={n: np.full_like(v, 2.0) for n, v in w.items()})
    before = _state(lm)
    ref = reference_model(lm, [a, b])
    for n in head:
        assert np.all(ref.model.get_parameter(n).detach().numpy() == 1.0)
    assert all(np.array_equal(_state(lm)[k], v) for k, v in before.items())
    with carrying(lm, [b, a]) as same:
        assert same is lm and all(np.all(lm.model.get_parameter(n).detach().numpy() == 2.0)
                                  for n in head)
    assert all(np.array_equal(_state(lm)[k], v) for k, v in before.items())


def test_logits_match_a_copy_for_fused_and_inserted_layers(tiny):
    lm, names, shapes, sha = tiny
    x = {k: v.numpy() for k, v in example_inputs(lm, 2, 5, seed=3).items()}
    for adapter in (synth_shira(shapes, sha, density=0.05, seed=2),
                    synth_sira(shapes, sha, experts=2, rank=2, top_k=1)):
        before = _state(lm)
        got = reference_logits(lm, adapter, x)
        with torch.no_grad():
            want = forward(reference_model(lm, adapter),
                           {k: torch.from_numpy(v) for k, v in x.items()}).numpy()
        np.testing.assert_array_equal(got, want)
        assert all(np.array_equal(_state(lm)[k], v) for k, v in before.items())
    with torch.no_grad():
        base = forward(lm, {k: torch.from_numpy(v) for k, v in x.items()}).numpy()
    np.testing.assert_array_equal(reference_logits(lm, None, x), base)
