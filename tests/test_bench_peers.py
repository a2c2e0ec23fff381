"""PEFT peers of the switch and synthesised adapters, checked against numpy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeadapt.bench.synth import shira_count, synth_lora, synth_shira, synth_sira
from edgeadapt.models import load_model, target_weight_names

pytest.importorskip("peft")

from edgeadapt.bench.peers import peft_lora_model, peft_shira_model, peft_switcher  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    lm = load_model("tiny-smollm2")
    names = target_weight_names(lm.model, "qv")
    sd = {n: t.detach().numpy().copy() for n, t in lm.model.state_dict().items()}
    shapes = {n: tuple(sd[n].shape) for n in names}
    return lm, names, sd, shapes, {n: "0" * 64 for n in names}


def _merged(pm, names):
    w = dict(pm.base_model.model.named_parameters())
    return {n: w[n.replace(".weight", ".base_layer.weight")].detach().numpy() for n in names}


def test_synth_shapes_and_counts(tiny):
    _, names, _, shapes, sha = tiny
    assert shira_count((100, 50), 0.01) == 50
    assert shira_count((3, 3), 0.01) == 1
    s = synth_shira(shapes, sha, density=0.02, seed=3)
    for n in names:
        idx = s.targets[n].indices
        assert idx.dtype == np.int64 and idx.size == round(0.02 * np.prod(shapes[n]))
        assert np.all(np.diff(idx) > 0) and idx[-1] < np.prod(shapes[n])
    assert s.meta["synthetic"] is True
    lo = synth_lora(shapes, sha, rank=4, method="sora")
    assert lo.method == "sora"
    assert all(lo.targets[n].A.shape == (4, shapes[n][1]) and
               lo.targets[n].B.shape == (shapes[n][0], 4) for n in names)
    si = synth_sira(shapes, sha, experts=3, rank=2, top_k=1)
    t = si.targets[names[0]]
    assert t.router.shape == (3, shapes[names[0]][1]) and t.A.shape[:2] == (3, 2)


def test_peft_shira_peer_merges_our_positions(tiny):
    lm, names, sd, shapes, sha = tiny
    ads = [synth_shira(shapes, sha, density=0.05, seed=s) for s in (1, 2)]
    pm, positions = peft_shira_model(lm.model, ads)
    assert positions == sum(d.indices.size for d in ads[0].targets.values())
    switch = peft_switcher(pm, ["a0", "a1"])
    for k in (0, 1, 0):
        switch()
        got = _merged(pm, names)
        for n in names:
            want = sd[n].ravel().copy()
            want[ads[k].targets[n].indices] += ads[k].targets[n].values
            np.testing.assert_allclose(got[n].ravel(), want, rtol=0, atol=1e-6)
    # the original model is untouched (the peer works on a copy)
    for n in names:
        np.testing.assert_array_equal(lm.model.state_dict()[n].numpy(), sd[n])


def test_peft_lora_peer_merges_b_at_a(tiny):
    lm, names, sd, shapes, sha = tiny
    ads = [synth_lora(shapes, sha, rank=4, seed=s) for s in (1, 2)]
    pm, rank = peft_lora_model(lm.model, ads)
    assert rank == 4
    switch = peft_switcher(pm, ["a0", "a1"])
    for k in (0, 1):
        switch()
        got = _merged(pm, names)
        for n in names:
            d = ads[k].targets[n]
            np.testing.assert_allclose(got[n], sd[n] + d.B @ d.A, rtol=0, atol=1e-5)
