"""Generation with unfused adapters on ONNX Runtime (tiny SmolLM2, q/v live): a LoRA with ranks
3, 1, 2 on three of the four live weights (pruned-SoRA-like, padded to the variant's rank 3) and
a SiRA on three of them run through their graph variants' KV-cache decoders, which
``ensure_variant`` writes for a ``--generate`` bundle. Greedy replies equal transformers'
``generate`` on the PyTorch model carrying the same adapter; every decode step's logits equal
the full forward's; a switch between a fused SHiRA and an unfused adapter (or between two
variants) re-prefills; a variant recorded without a decoder refuses with a typed error until
it is re-exported."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from generate_bundle import byte_tokenizer, export_generate  # noqa: E402
from runtime_reference import parity, register_adapters  # noqa: E402

from edgeadapt.adapters.reference import reference_greedy, reference_logits  # noqa: E402
from edgeadapt.errors import SwitchError  # noqa: E402
from edgeadapt.export.adapter import ensure_variant  # noqa: E402
from edgeadapt.format import read_adapter, read_manifest  # noqa: E402
from edgeadapt.format.fingerprint import weight_sha256  # noqa: E402
from edgeadapt.format.types import Adapter, LoraDelta, SiraBranch  # noqa: E402
from edgeadapt.models import load_model  # noqa: E402
from edgeadapt.runtime import get_backend, load  # noqa: E402
from edgeadapt.runtime.generate import open_generator  # noqa: E402

RTOL = 1e-4
CONTEXT = 96
PROMPT = [17, 301, 44, 9, 250, 77, 130]
LORA = ("lora", 3)
SIRA = ("sira", 3, 2, 2, 1.5)  # capacity factor E / top_k: no token dropped, whatever the call


def _unfused_adapters(lm, names, seed=3):
    """LoRA (ranks 3, 1, 2 on three of the weights, values N(0, 2^2), scale 0.8) and SiRA
    (E 3, r 2, top-2, on three of them, values N(0, 1)), from ``np.random.default_rng(seed)``:
    large enough that the tiny model's greedy replies differ from the base's repeated token."""
    rng = np.random.default_rng(seed)
    w = {n: lm.model.get_parameter(n).detach().numpy() for n in names}
    sha, shapes = {n: weight_sha256(v) for n, v in w.items()}, {n: v.shape for n, v in w.items()}

    def f32(*shape, s=1.0):
        return (s * rng.standard_normal(shape)).astype(np.float32)

    lora = {n: LoraDelta(f32(r, w[n].shape[1], s=2.0), f32(w[n].shape[0], r, s=2.0))
            for n, r in zip(names[:3], (3, 1, 2), strict=True)}
    sira = {n: SiraBranch(f32(3, w[n].shape[1]), f32(3, 2, w[n].shape[1]),
                          f32(3, w[n].shape[0], 2), 2, 1.5) for n in names[:3]}
    return {"lora": Adapter("lora", lora, {n: shapes[n] for n in lora},
                            {n: sha[n] for n in lora}, scale=0.8),
            "sira": Adapter("sira", sira, {n: shapes[n] for n in sira},
                            {n: sha[n] for n in sira})}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The generate bundle (tests/generate_bundle.py: fused SHiRA s1, s2) with the adapters
    ``lora`` and ``sira`` on their variants; and ``old``, a copy taken while its LoRA variant
    was recorded without a decoder (as exported before variants generated), after which
    ``ensure_variant`` (what re-exporting an adapter runs) adds that decoder alone and writes
    the SiRA variant whole (with the export's parity checks)."""
    torch.set_num_threads(1)
    lm = load_model("tiny-smollm2", seed=0)
    lm.tokenizer = byte_tokenizer()
    root = tmp_path_factory.mktemp("generate_unfused")
    bundle = export_generate(lm, root / "bundle", CONTEXT)
    manifest = read_manifest(bundle)
    adapters = _unfused_adapters(lm, sorted(manifest.weights))
    decoder = manifest.onnxruntime.pop("decoder")  # as if variants did not generate yet
    keys = {"lora": ensure_variant(bundle, manifest, LORA, check=False)}
    manifest.onnxruntime["decoder"] = decoder
    register_adapters(bundle, manifest, {"lora": adapters["lora"]}, keys)
    shutil.copytree(bundle, root / "old")
    assert ensure_variant(bundle, manifest, LORA, check=False) == keys["lora"]
    keys["sira"] = ensure_variant(bundle, manifest, SIRA)
    register_adapters(bundle, manifest, {"sira": adapters["sira"]}, keys)
    return lm, bundle, keys, root / "old"


def _adapter(bundle, name):
    return read_adapter(bundle / read_manifest(bundle).adapters[name].file)


def _hf_greedy(lm, bundle, name, ids, n):
    return reference_greedy(lm, [] if name is None else [_adapter(bundle, name)], ids, n,
                            read_manifest(bundle).extra["generate"]["eos_token_ids"])


def test_bundle_records_each_variants_decoder(exported):
    """variants[key].onnxruntime.decoder: its own graph, the forward variant's branch inputs,
    the base decoder's live-weight inputs (one buffer each for all four graphs), parity."""
    _, bundle, keys, _ = exported
    manifest = read_manifest(bundle)
    base = manifest.onnxruntime["decoder"]
    for key in keys.values():
        forward, decoder = (manifest.variants[key]["onnxruntime"],
                            manifest.variants[key]["onnxruntime"]["decoder"])
        assert decoder["file"] == f"decoder.{key}.onnx" and (bundle / decoder["file"]).is_file()
        assert decoder["branch_inputs"] == forward["branch_inputs"]
        assert decoder["branch"] == forward["branch"]
        assert {w: (e["name"], e["layout"]) for w, e in decoder["weights"].items()} == \
            {w: (e["name"], e["layout"]) for w, e in base["weights"].items()}
        assert decoder["cache"] == base["cache"] and decoder["layers"] == base["layers"]
    checked = manifest.variants[keys["sira"]]["onnxruntime"]["decoder"]["parity"]
    assert checked["max_rel_error"] <= RTOL and checked["chunks"] == [5, 3, 1, 1, 1, 1]


@pytest.mark.parametrize(("adapter", "mode"), [("lora", "live"), ("sira", "live"),
                                               ("lora", "repack")])
def test_greedy_equals_transformers_generate(exported, adapter, mode):
    lm, bundle, keys, _ = exported
    rt = load(bundle, mode=mode, threads=1)
    rt.switch(adapter)
    assert rt.active_variant == keys[adapter]
    out = rt.generate(PROMPT, max_new_tokens=40)
    assert out.ids == _hf_greedy(lm, bundle, adapter, PROMPT, 40)
    assert len(out.ids) == 40 and out.reprefills == 0
    assert out.ids != _hf_greedy(lm, bundle, None, PROMPT, 40)  # the branches matter


@pytest.mark.parametrize("adapter", ["lora", "sira"])
def test_decode_step_logits_equal_full_forward(exported, adapter):
    """A prefill of 5 tokens, a step of 3, then 17 single-token steps through the variant's
    decoder; each position's logits vs the PyTorch full forward of the whole sequence."""
    lm, bundle, _, _ = exported
    rt = load(bundle, mode="live", threads=1)
    rt.switch(adapter)
    gen = open_generator(rt.bundle_dir, rt.manifest, get_backend("onnxruntime"), rt.store,
                         device="cpu", threads=1)
    decoder = gen.decoder_for(rt.route)
    assert decoder is rt.route.decoder() and decoder is not gen.decoder
    ids = np.random.default_rng(4).integers(5, lm.vocab_size, size=25).astype(np.int64)
    want = reference_logits(lm, _adapter(bundle, adapter), {"input_ids": ids[None]})[0]
    base = reference_logits(lm, None, {"input_ids": ids[None]})[0]
    cache, start = decoder.empty_cache(1), 0
    for n in [5, 3] + [1] * 17:
        logits, cache = decoder.step(ids[None, start:start + n], cache)
        assert parity(logits[0], want[start:start + n]) <= RTOL, start
        assert parity(logits[0], base[start:start + n]) > 100 * RTOL  # the branches change it
        start += n


def test_switch_fused_to_unfused_mid_conversation_reprefills(exported):
    """SHiRA s1 (fused, base decoder) -> LoRA (unfused, its variant's decoder) between turns:
    the second turn re-prefills and equals a fresh conversation's and transformers' under the
    LoRA; a switch LoRA -> SiRA during a reply gives the rest under SiRA; back to the LoRA at
    scale 0.5, its decoder rebinds the new branch tensors."""
    lm, bundle, _, _ = exported
    rt = load(bundle, mode="live", threads=1)
    rt.switch("s1")
    chat = rt.conversation()
    first = chat.send(PROMPT, max_new_tokens=6)
    assert first.ids == _hf_greedy(lm, bundle, "s1", PROMPT, 6)
    rt.switch("lora")
    second = chat.send([40, 41, 42], max_new_tokens=10)
    history = PROMPT + first.ids + [40, 41, 42]
    assert second.reprefills == 1
    assert second.ids == rt.generate(history, max_new_tokens=10).ids \
        == _hf_greedy(lm, bundle, "lora", history, 10)
    assert second.ids != _hf_greedy(lm, bundle, "s1", history, 10)  # the switch matters
    pieces = chat.stream([50, 51], max_new_tokens=12)
    head = [next(pieces).token for _ in range(4)]
    rt.switch("sira")
    tail = [p.token for p in pieces]
    context = history + second.ids + [50, 51]
    assert head == _hf_greedy(lm, bundle, "lora", context, 4)
    assert tail == _hf_greedy(lm, bundle, "sira", context + head, 8)
    assert chat.last.reprefills == 1
    rt.switch("lora", 0.5)  # the LoRA variant again, other tensors: its decoder rebinds them
    third = chat.send([60], max_new_tokens=8)
    context += head + tail + [60]
    half = dataclasses.replace(_adapter(bundle, "lora"), scale=0.5)
    eos = read_manifest(bundle).extra["generate"]["eos_token_ids"]
    assert third.reprefills == 1 and third.ids == reference_greedy(lm, [half], context, 8, eos)
    assert third.ids != _hf_greedy(lm, bundle, "lora", context, 8)
    rt.switch(None)  # back on the base graph and decoder
    assert rt.generate(PROMPT, max_new_tokens=8).ids == _hf_greedy(lm, bundle, None, PROMPT, 8)


def test_variant_without_decoder_refuses(exported):
    """The bundle as exported before variants generated (its LoRA variant without a decoder):
    generating under the LoRA raises SwitchError naming the fix, the conversation and the
    runtime unchanged; fused adapters still generate. (The fixture re-exported it.)"""
    lm, _, keys, old = exported
    assert "decoder" not in read_manifest(old).variants[keys["lora"]]["onnxruntime"]
    rt = load(old, mode="live", threads=1)
    rt.switch("lora")
    chat = rt.conversation()
    with pytest.raises(SwitchError, match="re-export the variant"):
        chat.send(PROMPT, max_new_tokens=4)
    assert chat.tokens == [] and rt.active == ("lora",)
    rt.switch("s1")
    assert chat.send(PROMPT, max_new_tokens=4).ids == _hf_greedy(lm, old, "s1", PROMPT, 4)


def test_unfused_generation_imports_no_torch(exported, tmp_path):
    lm, bundle, _, _ = exported
    want = _hf_greedy(lm, bundle, "sira", PROMPT, 12)
    code = f"""
import sys, json
sys.modules['torch'] = None
from edgeadapt.runtime import load
rt = load({str(bundle)!r}, threads=1)
rt.switch('sira')
ids = rt.generate({PROMPT!r}, max_new_tokens=12).ids
print(json.dumps({{"ids": ids, "torch": sys.modules.get('torch') is not None}}))
"""
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out == {"ids": want, "torch": False}
