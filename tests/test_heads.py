"""Task heads: a classifier adapter carries its trained head, which replaces the bundle's head
weight on switch (never scaled, never added) and is restored bit for bit on the way back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeadapt.adapters import apply_adapter_torch
from edgeadapt.errors import AdapterFormatError, TargetMismatchError
from edgeadapt.export import export_base
from edgeadapt.format import read_adapter, read_manifest, write_adapter
from edgeadapt.format.types import Adapter, ShiraDelta
from edgeadapt.models import example_inputs, forward, head_weight_names, load_model


def _adapter(lm, manifest, seed: int) -> Adapter:
    rng = np.random.default_rng(seed)
    name = next(n for n in manifest.weights if n not in manifest.heads)
    out_f, in_f = manifest.weights[name].shape
    idx = np.sort(rng.choice(out_f * in_f, size=out_f * in_f // 10, replace=False))
    head = {h: rng.normal(0, 0.5, manifest.weights[h].shape).astype(np.float32)
            for h in manifest.heads}
    return Adapter(method="shira", targets={name: ShiraDelta(idx.astype(np.int64),
                   rng.normal(0, 0.1, idx.size).astype(np.float32))},
                   shapes={name: (out_f, in_f)},
                   weight_sha256={name: manifest.weights[name].sha256}, head=head)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("heads")
    export_base("tiny-minilm", out, backends=("onnxruntime",), targets="qv")
    return out


def test_head_names_are_the_classifier_matrix():
    lm = load_model("tiny-minilm")
    assert head_weight_names(lm.model, lm.kind) == ["classifier.weight"]
    causal = load_model("tiny-smollm2")
    assert head_weight_names(causal.model, causal.kind) == []


def test_head_round_trip_and_manifest_checks(bundle, tmp_path):
    manifest = read_manifest(bundle)
    assert manifest.heads == ["classifier.weight"]
    lm = load_model("tiny-minilm")
    adapter = _adapter(lm, manifest, 0)
    path = write_adapter(tmp_path / "a.eadp", adapter, "float16")
    back = read_adapter(path, manifest)
    np.testing.assert_array_equal(back.head["classifier.weight"],
                                  adapter.head["classifier.weight"])  # heads stay fp32
    bad = Adapter(adapter.method, adapter.targets, adapter.shapes, adapter.weight_sha256,
                  head={"classifier.weight": np.zeros((3, 32), np.float32)})
    with pytest.raises(AdapterFormatError, match="another number of labels"):
        read_adapter(write_adapter(tmp_path / "b.eadp", bad), manifest)
    stray = Adapter(adapter.method, adapter.targets, adapter.shapes, adapter.weight_sha256,
                    head={"bert.pooler.dense.weight": np.zeros((32, 32), np.float32)})
    with pytest.raises(TargetMismatchError, match="live head"):
        read_adapter(write_adapter(tmp_path / "c.eadp", stray), manifest)
    nan = dict(adapter.head)
    nan["classifier.weight"] = nan["classifier.weight"].copy()
    nan["classifier.weight"][0, 0] = np.nan
    with pytest.raises(AdapterFormatError, match="non-finite"):
        write_adapter(tmp_path / "d.eadp", Adapter(adapter.method, adapter.targets,
                      adapter.shapes, adapter.weight_sha256, head=nan))


def test_runtime_switch_replaces_head_and_restores_it(bundle, tmp_path):
    from edgeadapt.format.manifest import AdapterEntry, write_manifest
    from edgeadapt.runtime import load

    manifest = read_manifest(bundle)
    lm = load_model("tiny-minilm")
    a, b = _adapter(lm, manifest, 1), _adapter(lm, manifest, 2)
    for name, ad in (("a", a), ("b", b)):
        write_adapter(bundle / f"adapters/{name}.eadp", ad, "float32")
        manifest.adapters[name] = AdapterEntry(file=f"adapters/{name}.eadp", method="shira")
    write_manifest(bundle, manifest)

    inputs = {k: v.numpy() for k, v in example_inputs(lm, batch=2, seq=8).items()}
    rt = load(bundle, backend="onnxruntime", mode="live")
    base_out = rt.run(**inputs)
    with torch.no_grad():
        np.testing.assert_allclose(base_out, forward(lm, example_inputs(lm, 2, 8)).numpy(),
                                   rtol=1e-4, atol=1e-5)

    def reference(*adapters):
        ref = load_model("tiny-minilm")
        for ad in adapters:
            apply_adapter_torch(ref.model, ad)
        # the head of the first adapter wins: re-apply it last
        apply_adapter_torch(ref.model, Adapter("shira", {}, {}, {}, head=adapters[0].head))
        with torch.no_grad():
            return forward(ref, example_inputs(ref, 2, 8)).numpy()

    rt.switch("a")
    got_a = rt.run(**inputs)
    np.testing.assert_allclose(got_a, reference(a), rtol=1e-4, atol=1e-5)
    assert np.abs(got_a - base_out).max() > 1e-2  # the head really changed the output
    rt.switch(["b", "a"])
    np.testing.assert_allclose(rt.run(**inputs), reference(b, a), rtol=1e-4, atol=1e-5)
    rt.switch(None)
    np.testing.assert_array_equal(rt.run(**inputs), base_out)
    head = rt.store.live_weights()["classifier.weight"].torch_view()
    np.testing.assert_array_equal(head, lm.model.classifier.weight.detach().numpy())
