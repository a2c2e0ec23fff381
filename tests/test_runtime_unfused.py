"""Unfused mode on ONNX Runtime: SiRA and LoRA (ranks padded) through the bundle's graph variants.

Reference: the PyTorch model carrying the same adapter read back from the bundle's file
(``apply_adapter_torch``: SiRA layers inserted, LoRA fused into the weights). Base output and
base weights are checked bit for bit against the freshly loaded runtime and the bundle's hashes.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from runtime_reference import (  # noqa: E402
    example_pair,
    export_tiny,
    parity,
    register_adapters,
    requested,
    torch_reference,
)
from switching import runs_while_switching  # noqa: E402

from edgeadapt.errors import (  # noqa: E402
    BundleError,
    ConfigError,
    SwitchError,
    UnknownNameError,
)
from edgeadapt.export.adapter import ensure_variant  # noqa: E402
from edgeadapt.format import (  # noqa: E402
    read_manifest,
    write_adapter,
    write_manifest,
)
from edgeadapt.format.fingerprint import weight_sha256  # noqa: E402
from edgeadapt.format.manifest import AdapterEntry  # noqa: E402
from edgeadapt.format.types import Adapter, LoraDelta, ShiraDelta, SiraBranch  # noqa: E402
from edgeadapt.runtime import load  # noqa: E402
from edgeadapt.runtime.backends.onnxruntime import kernel as onnxruntime_kernel  # noqa: E402

RTOL = 1e-4
SIRA = ("sira", 3, 2, 2, 1.25)


def _adapters(lm, names, seed=1):
    """SiRA on three of the live weights, LoRA with per-weight ranks 3/1 (pruned-SoRA-like, on
    every other weight), a fused SHiRA, and a SiRA whose top_k does not fit the variant."""
    rng = np.random.default_rng(seed)
    params = dict(lm.model.named_parameters())
    w = {n: params[n].detach().numpy() for n in names}
    sha = {n: weight_sha256(v) for n, v in w.items()}
    shapes = {n: tuple(v.shape) for n, v in w.items()}

    def f32(*shape, s=0.5):
        return (s * rng.standard_normal(shape)).astype(np.float32)

    def sira(sel, top_k=2):
        t = {n: SiraBranch(f32(3, w[n].shape[1], s=1.0), f32(3, 2, w[n].shape[1]),
                           f32(3, w[n].shape[0], 2), top_k, 1.25) for n in sel}
        return Adapter("sira", t, {n: shapes[n] for n in sel}, {n: sha[n] for n in sel})

    lora = {n: LoraDelta(f32(r, w[n].shape[1]), f32(w[n].shape[0], r))
            for n, r in zip(names[::2], (3, 1), strict=False)}
    idx = {n: np.sort(rng.choice(w[n].size, w[n].size // 20, replace=False)) for n in names}
    shira = {n: ShiraDelta(i.astype(np.int64), f32(i.size, s=1.0)) for n, i in idx.items()}
    return {"sira": (sira(names[:3]), "sira"),
            "lora": (Adapter("lora", lora, {n: shapes[n] for n in lora},
                             {n: sha[n] for n in lora}, scale=0.8), "lora"),
            "s1": (Adapter("shira", shira, shapes, sha), None),
            "sira_bad": (sira(names[:1], top_k=1), "sira")}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("unfused")
    lm, manifest = export_tiny("tiny-smollm2", out)
    keys = {"sira": ensure_variant(out, manifest, SIRA, check=False),
            "lora": ensure_variant(out, manifest, ("lora", 4), check=False)}
    adapters = _adapters(lm, sorted(manifest.weights))
    register_adapters(out, manifest, {n: ad for n, (ad, _) in adapters.items()},
                      {n: keys.get(kind) for n, (_, kind) in adapters.items()})
    return lm, out, keys


def _hashes(rt):
    return {n: hashlib.sha256(lw.array.tobytes()).hexdigest()
            for n, lw in rt.store.live_weights().items()}


@pytest.mark.parametrize("form", ["live", "live-matmul", "repack"])
def test_unfused_switches_match_pytorch(exported, form):
    """live: the live weights read by edgeadapt's kernel where it builds (base and variant
    sessions alike); live-matmul: through MatMul (kernel=False)."""
    lm, bundle, keys = exported
    t_in, np_in = example_pair(lm)
    mode = form.split("-")[0]
    rt = load(bundle, mode=mode, threads=1, kernel=False if form == "live-matmul" else None)
    assert rt.store.kernel == (form == "live" and
                               onnxruntime_kernel.unavailable() is None)
    base = rt.run(**np_in)
    h0 = _hashes(rt)
    seq = [("sira", None, keys["sira"]), ("lora", None, keys["lora"]),
           ("lora", 0.5, keys["lora"]), ("s1", None, None), ("sira", 2.0, keys["sira"]),
           (["s1"], [0.5], None), (None, None, None)]
    for names, scale, variant in seq:
        rt.switch(names, scale)
        expected = requested(bundle, names, scale)  # what was asked, not what rt reports
        assert rt.active_scales == expected
        assert rt.active_variant == variant
        assert rt.mode == ("unfused" if variant else mode)
        want = torch_reference(lm, bundle, expected, t_in)
        got = rt.run(**np_in)
        assert parity(got, want) <= RTOL, (form, names, scale)
        if names is None:
            assert np.array_equal(got, base)
        else:
            assert parity(got, base) > 10 * parity(got, want), names
        if variant:  # unfused: the base weights are exactly the base
            assert _hashes(rt) == h0
            assert rt.route.kernel == rt.store.kernel
    lora_scale = dict(rt.prepare_unfused("lora").feeds(0.5).items())
    b_name = next(iter(read_manifest(bundle).variants[keys["lora"]]["onnxruntime"]["branch_inputs"]
                       .values()))["B"]
    np.testing.assert_array_equal(lora_scale[b_name],
                                  rt.prepare_unfused("lora").tensors[b_name] * np.float32(0.5))


def test_sira_then_fused_then_base_is_bit_identical(exported):
    lm, bundle, _ = exported
    _, np_in = example_pair(lm)
    rt = load(bundle, threads=1)
    base = rt.run(**np_in)
    manifest = read_manifest(bundle)
    rt.switch("sira")
    rt.switch("s1")
    assert rt.active == ("s1",) and rt.active_variant is None
    rt.switch(None)
    assert np.array_equal(rt.run(**np_in), base)
    for name, lw in rt.store.live_weights().items():
        assert weight_sha256(lw.torch_weight()) == manifest.weights[name].sha256


def test_bad_unfused_switches_are_refused_untouched(exported):
    lm, bundle, _ = exported
    _, np_in = example_pair(lm)
    rt = load(bundle, threads=1)
    rt.switch("s1")
    fused_out, h_fused = rt.run(**np_in), _hashes(rt)
    for names, err, text in [(["sira", "s1"], ConfigError, "alone"),
                             (["lora", "sira"], ConfigError, "alone"),
                             (["s1", "lora"], ConfigError, "alone"),
                             ("nope", UnknownNameError, "nope"),
                             (["sira", "nope"], UnknownNameError, "nope"),
                             ("sira_bad", SwitchError, "does not fit")]:
        with pytest.raises(err, match=text):
            rt.switch(names)
        assert rt.active == ("s1",) and rt.active_variant is None
        assert _hashes(rt) == h_fused
        assert np.array_equal(rt.run(**np_in), fused_out)
    for name in ("sira", "lora"):  # scale * B overflows float32: refused before any binding
        with pytest.raises(SwitchError, match="overflow"):
            rt.switch(name, 1e39)
        assert rt.active == ("s1",) and rt.active_variant is None
        assert _hashes(rt) == h_fused
        assert np.array_equal(rt.run(**np_in), fused_out)
    rt.switch("sira")
    sira_out = rt.run(**np_in)
    with pytest.raises(ConfigError, match="alone"):
        rt.switch(["sira", "s1"])
    assert rt.active_variant is not None and np.array_equal(rt.run(**np_in), sira_out)
    with pytest.raises(SwitchError, match="fused switching"):
        rt.prepare("sira")


def test_unfused_switch_that_does_not_fit_its_graph_keeps_the_fused_adapter(exported):
    """A bundle.json whose branch inputs do not fit the variant graph (A and B of one weight
    swapped): the unfused switch is refused before the fused adapter is taken off."""
    lm, bundle, keys = exported
    _, np_in = example_pair(lm)
    rt = load(bundle, threads=1)
    inputs = rt.manifest.variants[keys["lora"]]["onnxruntime"]["branch_inputs"]
    w = next(w for w, (o, i) in ((w, rt.manifest.weights[w].shape) for w in inputs) if o != i)
    inputs[w] = {"A": inputs[w]["B"], "B": inputs[w]["A"]}
    rt.switch("s1")
    fused_out, h_fused = rt.run(**np_in), _hashes(rt)
    with pytest.raises(BundleError, match="cannot take"):
        rt.switch("lora")
    assert rt.active == ("s1",) and rt.active_variant is None
    assert _hashes(rt) == h_fused and np.array_equal(rt.run(**np_in), fused_out)


def test_runs_during_unfused_switches_see_whole_states(exported):
    lm, bundle, _ = exported
    _, np_in = example_pair(lm)
    rt = load(bundle, threads=1)
    states = [None, "s1", "sira", "lora"]
    valid = []
    for s in states:
        rt.switch(s)
        valid.append(rt.run(**np_in))
    errors, outs = runs_while_switching(lambda: rt.run(**np_in), rt.switch, states, readers=2,
                                        switches=60, seed=0, min_runs=10)
    assert not errors
    assert len(outs) >= 10
    assert all(any(np.array_equal(o, v) for v in valid) for o in outs)


def test_unfused_path_imports_no_torch(exported, tmp_path):
    lm, bundle, _ = exported
    t_in, np_in = example_pair(lm)
    np.save(tmp_path / "ids.npy", np_in["input_ids"])
    np.save(tmp_path / "want.npy", torch_reference(lm, bundle, [("sira", 1.0)], t_in))
    code = f"""
import sys, json
sys.modules['torch'] = None
import numpy as np
from edgeadapt.runtime import load
rt = load({str(bundle)!r}, threads=1)
x = np.load({str(tmp_path / 'ids.npy')!r}); want = np.load({str(tmp_path / 'want.npy')!r})
base = rt.run(input_ids=x)
rt.switch('sira'); got = rt.run(input_ids=x)
rt.switch(None)
print(json.dumps({{"err": float(np.abs(got - want).max() / np.abs(want).max()),
                  "base": bool(np.array_equal(rt.run(input_ids=x), base)),
                  "torch": 'torch' in sys.modules and sys.modules['torch'] is not None}}))
"""
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["err"] <= RTOL and out["base"] and not out["torch"]


@pytest.mark.slow
def test_unfused_classifier_adapter_brings_its_head(tmp_path):
    """A SiRA adapter on tiny MiniLM carrying a trained head: the head is swapped in (fused,
    the engine) while the branches run unfused; None restores base output bit for bit."""
    lm, manifest = export_tiny("tiny-minilm", tmp_path, num_labels=2)
    key = ensure_variant(tmp_path, manifest, SIRA, check=False)
    params = {n: p.detach().numpy() for n, p in lm.model.named_parameters()}
    rng = np.random.default_rng(0)
    tw = [n for n in manifest.weights if "query" in n]
    hw = [n for n in manifest.weights if n.startswith("classifier")]
    assert tw and hw

    def f32(*shape, s=0.5):
        return (s * rng.standard_normal(shape)).astype(np.float32)

    t = {n: SiraBranch(f32(3, params[n].shape[1], s=1.0), f32(3, 2, params[n].shape[1]),
                       f32(3, params[n].shape[0], 2), 2, 1.25) for n in tw}
    ad = Adapter("sira", t, {n: params[n].shape for n in tw},
                 {n: weight_sha256(params[n]) for n in tw},
                 head={n: f32(*params[n].shape, s=1.0) for n in hw})
    (tmp_path / "adapters").mkdir()
    write_adapter(tmp_path / "adapters" / "h.eadp", ad, value_dtype="float32")
    manifest.adapters["h"] = AdapterEntry(file="adapters/h.eadp", method="sira", variant=key)
    write_manifest(tmp_path, manifest)
    t_in, np_in = example_pair(lm)
    rt = load(tmp_path, threads=1)
    base = rt.run(**np_in)
    rt.switch("h")
    got, want = rt.run(**np_in), torch_reference(lm, tmp_path, [("h", 1.0)], t_in)
    assert parity(got, want) <= RTOL and parity(got, base) > 10 * parity(got, want)
    rt.switch(None)
    assert np.array_equal(rt.run(**np_in), base)
