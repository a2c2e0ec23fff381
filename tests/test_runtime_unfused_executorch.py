"""Unfused mode on ExecuTorch: the variant .pte programs, branch tensors as mutable buffers.

Slow: each test lowers a base program and its variant programs (a one-block model, pte only,
one static shape for SiRA: still minutes on a shared 2-core machine). Reference: the PyTorch
model carrying the same adapter (``apply_adapter_torch``); base output and weights bit for bit
(read back through each program's ``get_attribute``).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("executorch")

from runtime_reference import requested  # noqa: E402
from test_runtime_unfused import RTOL, SIRA, _adapters, parity, torch_reference  # noqa: E402

from edgeadapt.errors import BundleError, SwitchError  # noqa: E402
from edgeadapt.export.adapter import ensure_variant  # noqa: E402
from edgeadapt.export.bundle import export_base  # noqa: E402
from edgeadapt.format import read_adapter, read_manifest, write_adapter, write_manifest  # noqa: E402
from edgeadapt.format.manifest import AdapterEntry  # noqa: E402
from edgeadapt.format.types import Adapter, LoraDelta, ShiraDelta, SiraBranch  # noqa: E402
from edgeadapt.models import example_inputs, load_model  # noqa: E402
from edgeadapt.runtime import load  # noqa: E402

SEQ = 16  # the SiRA variants' one static shape is (1, SEQ); dynamic programs run it too


def one_block_llama_dir(path) -> str:
    """A saved one-block Llama (hidden 32): the architecture of tiny-smollm2, half the lowering;
    ``load_model(dir)`` reloads it bit for bit, as ``ensure_variant`` needs."""
    from test_runtime_executorch import one_block_llama

    one_block_llama().model.save_pretrained(path)
    return str(path)


@pytest.mark.slow
def test_executorch_unfused_matches_pytorch(tmp_path_factory):
    torch.set_num_threads(1)
    lm = load_model(one_block_llama_dir(tmp_path_factory.mktemp("llama1")), seed=0)
    tmp_path = tmp_path_factory.mktemp("et_unfused")
    export_base(lm, tmp_path, backends=("executorch",), targets="qv", check=False, pte_repack=False)
    manifest = read_manifest(tmp_path)
    keys = {"sira": ensure_variant(tmp_path, manifest, SIRA, check=False,
                                   pte_shapes=[(1, SEQ)]),
            "lora": ensure_variant(tmp_path, manifest, ("lora", 4), check=False)}
    (tmp_path / "adapters").mkdir()
    ads = _adapters(lm, sorted(manifest.weights))
    w0 = sorted(manifest.weights)[0]
    big = Adapter("lora", {w0: LoraDelta(np.ones((5, manifest.weights[w0].shape[1]), np.float32),
                                         np.ones((manifest.weights[w0].shape[0], 5), np.float32))},
                  {w0: tuple(manifest.weights[w0].shape)},
                  {w0: manifest.weights[w0].sha256})
    ads["big"] = (big, "lora")
    ads["lora2"] = ads["lora"]
    for name, (ad, kind) in ads.items():
        write_adapter(tmp_path / "adapters" / f"{name}.eadp", ad, value_dtype="float32")
        manifest.adapters[name] = AdapterEntry(file=f"adapters/{name}.eadp", method=ad.method,
                                               variant=keys.get(kind))
    write_manifest(tmp_path, manifest)
    t_in = example_inputs(lm, batch=1, seq=SEQ, seed=3)
    np_in = {k: v.numpy() for k, v in t_in.items()}
    rt = load(tmp_path, backend="executorch")
    base = rt.run(**np_in)
    h0 = {w: rt.store.read_back(w) for w in manifest.weights}
    for names, scale in [("sira", None), ("lora", 0.5), ("s1", None), ("sira", 2.0),
                         ("lora", None)]:
        rt.switch(names, scale)
        expected = requested(tmp_path, names, scale)  # what was asked, not what rt reports
        assert rt.active_scales == expected, names
        assert rt.active_variant == keys.get(names), names
        want = torch_reference(lm, tmp_path, expected, t_in)
        got = rt.run(**np_in)
        assert parity(got, want) <= RTOL, names
        assert parity(got, base) > 10 * parity(got, want), names
        if rt.active_variant:  # unfused: both programs hold the base weights exactly
            variant = rt.route.store
            for w in manifest.weights:
                assert np.array_equal(rt.store.read_back(w), h0[w]), (names, w)
                assert np.array_equal(variant.read_back(w), h0[w]), (names, w)
    with pytest.raises(SwitchError, match="exceeds"):
        rt.switch("big")
    assert rt.active == ("lora",)
    rt.switch(None)
    assert rt.active_variant is None and np.array_equal(rt.run(**np_in), base)
    # Refused unfused switches keep the fused adapter: a scale whose s * B overflows float32,
    # and (a bundle.json whose LoRA variant claims rank 5) branch tensors its buffers cannot take.
    rt.switch("s1")
    fused = rt.run(**np_in)
    with pytest.raises(SwitchError, match="overflow"):
        rt.switch("lora", 1e39)
    rt.manifest.variants[keys["lora"]]["branch"]["spec"] = ["lora", 5]
    with pytest.raises(BundleError, match="cannot take"):
        rt.switch("lora2")  # not prepared yet: padded to the claimed rank
    assert rt.active == ("s1",) and rt.active_variant is None
    assert np.array_equal(rt.run(**np_in), fused)


def one_layer_bert_dir(path) -> str:
    """A saved one-layer BERT encoder (hidden 32): the architecture of tiny-minilm, half the
    lowering. ``load_model(dir, num_labels, seed)`` adds the same mean-pool head every time, so
    ``ensure_variant`` can reload it."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    BertModel(config, add_pooling_layer=False).save_pretrained(path)
    return str(path)


def _head_adapters(manifest, seed: int = 2) -> dict[str, Adapter]:
    """SiRA with a task head, SiRA without one, fused SHiRA with another head."""
    rng = np.random.default_rng(seed)
    names = [n for n in sorted(manifest.weights) if n not in manifest.heads]
    shapes = {n: tuple(manifest.weights[n].shape) for n in names}
    sha = {n: manifest.weights[n].sha256 for n in names}
    E, r, top_k, cf = SIRA[1:]

    def f32(*shape, s=0.5):
        return (s * rng.standard_normal(shape)).astype(np.float32)

    def head():
        return {h: f32(*manifest.weights[h].shape, s=1.0) for h in manifest.heads}

    def sira(with_head):
        t = {n: SiraBranch(f32(E, shapes[n][1], s=1.0), f32(E, r, shapes[n][1]),
                           f32(E, shapes[n][0], r), top_k, cf) for n in names}
        return Adapter("sira", t, shapes, sha, head=head() if with_head else {})

    idx = {n: np.sort(rng.choice(np.prod(shapes[n]), np.prod(shapes[n]) // 10, replace=False))
           for n in names}
    shira = {n: ShiraDelta(i.astype(np.int64), f32(i.size, s=1.0)) for n, i in idx.items()}
    return {"sira_h": sira(True), "sira_nh": sira(False),
            "shira_h": Adapter("shira", shira, shapes, sha, head=head())}


@pytest.fixture(scope="module")
def classifier_bundle(tmp_path_factory):
    torch.set_num_threads(1)
    lm = load_model(one_layer_bert_dir(tmp_path_factory.mktemp("bert1")), num_labels=3, seed=0)
    out = tmp_path_factory.mktemp("et_heads")
    export_base(lm, out, backends=("executorch",), targets="qv", check=False, pte_repack=False)
    manifest = read_manifest(out)
    key = ensure_variant(out, manifest, SIRA, check=False, pte_shapes=[(1, SEQ)])
    (out / "adapters").mkdir()
    for name, ad in _head_adapters(manifest).items():
        write_adapter(out / "adapters" / f"{name}.eadp", ad, value_dtype="float32")
        manifest.adapters[name] = AdapterEntry(file=f"adapters/{name}.eadp", method=ad.method,
                                               variant=key if ad.method == "sira" else None)
    write_manifest(out, manifest)
    return lm, out, key


@pytest.mark.slow
def test_executorch_sira_head_matches_pytorch_and_restores(classifier_bundle):
    """An unfused (SiRA) adapter's task head is written into the variant program: the output
    equals PyTorch with the same adapter and head; a fused adapter's head / None then put the
    heads back exactly (read back through each program's get_attribute)."""
    lm, bundle, key = classifier_bundle
    (head,) = read_manifest(bundle).heads
    h0 = lm.model.get_parameter(head).detach().numpy().copy()
    t_in = example_inputs(lm, batch=1, seq=SEQ, seed=3)
    np_in = {k: v.numpy() for k, v in t_in.items()}
    rt = load(bundle, backend="executorch")
    base = rt.run(**np_in)
    assert parity(base, torch_reference(lm, bundle, [], t_in)) <= RTOL

    for names, scale in [("sira_h", None), ("shira_h", None), ("sira_h", 2.0), ("sira_nh", None),
                         ("sira_h", None), (None, None)]:
        rt.switch(names, scale)
        expected = requested(bundle, names, scale)  # what was asked, not what rt reports
        assert rt.active_scales == expected, names
        assert rt.active_variant == (key if names and names.startswith("sira") else None)
        want = torch_reference(lm, bundle, expected, t_in)
        got = rt.run(**np_in)
        assert parity(got, want) <= RTOL, names
        if names is None:
            assert np.array_equal(got, base)
        else:
            assert parity(got, base) > 10 * parity(got, want), names
        want_head = {"sira_h": "sira_h", "shira_h": "shira_h"}.get(names)
        h_want = h0 if want_head is None else read_adapter(
            bundle / f"adapters/{want_head}.eadp").head[head]
        program = rt.route.store if rt.active_variant else rt.store
        assert np.array_equal(program.read_back(head), h_want), names
        # unfused: the engine puts the adapter's head into the base program as well
        assert np.array_equal(rt.store.read_back(head), h_want), names
    assert np.array_equal(rt.store.read_back(head), h0)
