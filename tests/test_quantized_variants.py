"""Unfused LoRA and SiRA on quantized ONNX Runtime bundles (``--weights int8|int4``): graph
variants whose rest is the base's ``MatMulNBits`` and whose live weights are the runtime's codes
+ scales, the branches in float beside them.

Reference: the PyTorch reference of the quantized bundle
(:func:`edgeadapt.models.quantized.quantize_reference_`) carrying the adapter as the runtime
runs it, unfused (:func:`edgeadapt.adapters.reference.reference_logits`: LoRA / SiRA layers
inserted beside the codes; a fused SHiRA re-quantizes them). The outputs are compared, as the
export's check compares them, on a copy of the bundle whose ``MatMulNBits`` compute with float
activations (``onnx_quant.float_activations``), against the weight-only reference: with the
rest's int8 activations a float difference that moves one activation across a rounding
boundary changes it by a whole step (seen on this model with other adapter values: 3e-3 at
one position, 2e-7 elsewhere), so only the float form holds a tolerance that catches a wrong
weight. The bundle as shipped is checked against the reference with the activations quantized
as ``MatMulNBits`` does, within such steps."""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil

import numpy as np
import onnx
import pytest
import torch
from runtime_reference import example_pair, register_adapters
from test_generate_unfused import _unfused_adapters
from test_runtime_quantized import _codes, _shira

from edgeadapt.adapters.reference import apply_adapters, reference_greedy, reference_logits
from edgeadapt.errors import BundleError, ConfigError
from edgeadapt.export.adapter import ensure_variant, export_adapter, lora_unfused_by_default
from edgeadapt.export.bundle import export_base
from edgeadapt.export.onnx_quant import QUANT_RTOL, float_activations
from edgeadapt.format import read_manifest, write_adapter, write_manifest
from edgeadapt.format.quant import grid
from edgeadapt.models import load_model
from edgeadapt.models.quantized import quantize_reference_
from edgeadapt.numeric import rel_error
from edgeadapt.runtime import load

TOL = 1e-4  # the quantized runtime tests' (tests/test_runtime_quantized.py)
STEPS = 2e-2  # the shipped bundle (int8 activations) against the reference quantizing them
LORA, SIRA = "lora-r3", "sira-e3-r2-k2-c1.5"
PROMPT = [17, 301, 44, 9, 250, 77]


def _reference(lm, precision: str, live: list[str], activations: bool):
    """A copy of ``lm`` made the PyTorch reference of its ``precision`` bundle (the rest's
    activations quantized, or float throughout)."""
    ref = dataclasses.replace(lm, model=copy.deepcopy(lm.model))
    quantize_reference_(ref, precision, live=live, activations=activations)
    return ref


def _float_activations_copy(bundle, dest):
    """A copy of ``bundle`` whose graphs' ``MatMulNBits`` compute with float activations."""
    shutil.copytree(bundle, dest)
    for path in dest.glob("*.onnx"):
        with float_activations(path) as rewritten:
            os.replace(rewritten, path)
    return dest


# int8 in `make test-slow` (the default run is near its 15-minute CI budget); int4 covers the
# same graphs by default
@pytest.fixture(scope="module", params=(pytest.param("int8", marks=pytest.mark.slow), "int4"))
def bundle(request, tmp_path_factory):
    """Tiny SmolLM2 (q/v live) exported at the precision (int4 with its KV-cache decoder);
    the LoRA (ranks 3, 1, 2) and SiRA of tests/test_generate_unfused.py exported into it by
    ``export_adapter`` from .eadp files, ``unfused`` not given (int4: the LoRA variant and its
    decoder with the export's parity checks); a SHiRA "s1" and the same LoRA registered fused
    ("lora_fused"). Returns the model, the bundle, its float-activation copy, the precision,
    the adapters and the weight-only reference."""
    from generate_bundle import export_generate

    torch.set_num_threads(1)
    precision = request.param
    lm = load_model("tiny-smollm2", seed=0)
    root = tmp_path_factory.mktemp(f"qvariants-{precision}")
    out = root / "bundle"
    if precision == "int4":
        export_generate(lm, out, max_context=64, precision=precision, check=False)
    else:
        export_base(lm, out, backends="onnxruntime", targets="qv", precision=precision,
                    check=False)
    names = sorted(read_manifest(out).weights)
    adapters = _unfused_adapters(lm, names)
    for name, ad in adapters.items():
        path = write_adapter(root / f"{name}.eadp", ad, value_dtype="float32")
        export_adapter(path, out, name, check=precision == "int4" and name == "lora")
    adapters["s1"] = _shira(lm, names, grid(precision), 0.2, 3.0, np.random.default_rng(2))
    register_adapters(out, read_manifest(out), {"s1": adapters["s1"],
                                                "lora_fused": adapters["lora"]})
    flt = _float_activations_copy(out, root / "float")
    return lm, out, flt, precision, adapters, _reference(lm, precision, names, False)


def test_variant_graph_keeps_the_quantized_rest_and_the_live_codes(bundle):
    """The LoRA variant (exported by default for a LoRA on a quantized base) and the SiRA
    variant: the base graph's MatMulNBits (no more: the branches stay float), its codes +
    scales inputs under the same names (bundle.json's entries equal the base's), the live
    file shared; the checked one passed the export's parity check, its code edit seen."""
    _, out, _, precision, _, _ = bundle
    manifest = read_manifest(out)
    assert lora_unfused_by_default(manifest)
    assert manifest.adapters["lora"].variant == LORA
    assert manifest.adapters["lora_fused"].variant is None

    def graph(file):
        model = onnx.load(str(out / file), load_external_data=False)
        ops = [n.op_type for n in model.graph.node]
        inputs = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
        return ops.count("MatMulNBits"), inputs

    rest, base_inputs = graph(manifest.onnxruntime["file"])
    assert rest > 0
    for key in (LORA, SIRA):
        section = manifest.variants[key]["onnxruntime"]
        assert section["precision"] == precision
        assert section["live_weights"] == manifest.onnxruntime["live_weights"]
        n, inputs = graph(section["file"])
        assert n == rest
        for w, entry in manifest.weights.items():
            assert manifest.variants[key]["weights"][w]["onnxruntime"] == entry.onnxruntime
            q = entry.onnxruntime
            assert inputs[q["name"]] == onnx.TensorProto.INT8
            assert inputs[q["quant"]["scales"]] == onnx.TensorProto.FLOAT
        branches = [i for b in section["branch_inputs"].values() for i in b.values()]
        assert branches and all(inputs[b] == onnx.TensorProto.FLOAT for b in branches)
        assert set(inputs) == set(base_inputs) | set(branches)
    if precision == "int4":
        for section in (manifest.variants[LORA]["onnxruntime"],
                        manifest.variants[LORA]["onnxruntime"]["decoder"]):
            assert section["precision"] == "int4"
            assert section["parity"]["max_rel_error"] <= QUANT_RTOL
        assert manifest.variants[LORA]["onnxruntime"]["parity"]["edit_moved"] > QUANT_RTOL


@pytest.mark.parametrize("name", ["lora", "sira"])
def test_unfused_adapter_matches_the_quantized_reference(bundle, name):
    """Through the variant's session (codes read by edgeadapt's kernel, branches bound), at the
    adapter's scale and at 0.5: the reference within TOL (float activations), far from the
    base, the codes untouched; the shipped bundle within STEPS of the reference quantizing
    the activations; None: the base bit for bit."""
    lm, out, flt, precision, adapters, ref = bundle
    _, inputs = example_pair(lm)
    rt = load(flt, threads=1)
    assert rt.store.kernel
    base = rt.run(**inputs)
    exported = _codes(rt)
    for scale in (None, 0.5):
        rt.switch(name, scale)
        assert rt.mode == "unfused" and rt.active_variant == (LORA if name == "lora" else SIRA)
        got = rt.run(**inputs)
        assert rel_error(got, reference_logits(ref, adapters[name], inputs, scale)) < TOL
        assert rel_error(got, base) > 1e-2
        assert all(np.array_equal(_codes(rt)[n], exported[n]) for n in exported)
    rt.switch(None)
    assert np.array_equal(rt.run(**inputs), base)
    rt.engine.verify_base()
    shipped = load(out, threads=1)
    shipped.switch(name)
    steps = _reference(lm, precision, list(rt.manifest.weights), True)
    assert rel_error(shipped.run(**inputs), reference_logits(steps, adapters[name], inputs)) \
        < STEPS


def test_shira_on_codes_then_lora_unfused_share_the_buffers(bundle):
    """SHiRA fused on codes, then the LoRA unfused (the SHiRA taken off: the exported codes,
    the LoRA's reference), then both: a SHiRA the engine writes into the shared codes while
    the LoRA's route is active reaches the variant's session (the reference with s1's codes
    and the LoRA beside them); None ends on the exported codes bit for bit."""
    lm, _, flt, _, adapters, ref = bundle
    _, inputs = example_pair(lm)
    rt = load(flt, threads=1)
    exported = _codes(rt)
    rt.switch("s1")
    assert rel_error(rt.run(**inputs), reference_logits(ref, adapters["s1"], inputs)) < TOL
    rt.switch("lora")
    assert all(np.array_equal(_codes(rt)[n], exported[n]) for n in exported)
    lora_only = reference_logits(ref, adapters["lora"], inputs)
    assert rel_error(rt.run(**inputs), lora_only) < TOL
    rt.engine.switch([(rt.prepare("s1"), 1.0)])  # the engine alone: the route stays
    assert rt.active_variant == LORA
    both = dataclasses.replace(ref, model=copy.deepcopy(ref.model))
    apply_adapters(both.model, adapters["s1"])
    want = reference_logits(both, adapters["lora"], inputs)
    assert rel_error(rt.run(**inputs), want) < TOL
    assert rel_error(want, lora_only) > 5 * TOL  # s1 matters
    rt.switch(None)
    assert rt.saturated == {}
    assert all(np.array_equal(_codes(rt)[n], exported[n]) for n in exported)
    rt.engine.verify_base()


def test_lora_registered_fused_runs_unfused_where_a_variant_exists(bundle, tmp_path):
    """A LoRA registered without a variant runs through the bundle's LoRA variant on a
    quantized base (the output of the same LoRA exported unfused); in a copy without
    variants it fuses on the codes, with a warning."""
    lm, out, _, _, _, _ = bundle
    _, inputs = example_pair(lm)
    rt = load(out, threads=1)
    assert rt.is_unfused("lora_fused") and not rt.is_unfused("s1")
    rt.switch("lora_fused")
    assert rt.active_variant == LORA
    got = rt.run(**inputs)
    rt.switch("lora")
    assert np.array_equal(rt.run(**inputs), got)
    bare = tmp_path / "bundle"
    shutil.copytree(out, bare)
    manifest = read_manifest(bare)
    manifest.variants.clear()
    manifest.adapters = {k: e for k, e in manifest.adapters.items() if e.variant is None}
    write_manifest(bare, manifest)
    rt = load(bare, threads=1)
    assert not rt.is_unfused("lora_fused")
    with pytest.warns(UserWarning, match="rounds away"):
        rt.switch("lora_fused")
    assert rt.mode == "live"


def test_variant_of_another_precision_is_refused(bundle, tmp_path):
    """A variant recorded for other weights than the base's: BundleError at the switch, the
    runtime unchanged."""
    lm, out, _, _, _, _ = bundle
    _, inputs = example_pair(lm)
    copied = tmp_path / "bundle"
    shutil.copytree(out, copied)
    manifest = read_manifest(copied)
    manifest.variants[LORA]["onnxruntime"]["precision"] = "fp32"
    write_manifest(copied, manifest)
    rt = load(copied, threads=1)
    rt.switch("s1")
    before = rt.run(**inputs)
    with pytest.raises(BundleError, match="re-export the variant"):
        rt.switch("lora")
    assert rt.active == ("s1",) and np.array_equal(rt.run(**inputs), before)


def test_executorch_quantized_variants_are_refused(bundle):
    """A bundle whose ExecuTorch program is quantized too: no variant (ConfigError naming
    ONNX Runtime, nothing exported), and a LoRA stays fused by default."""
    _, out, _, precision, _, _ = bundle
    manifest = read_manifest(out)
    manifest.executorch = {"file": "model.pte", "precision": precision}
    assert not lora_unfused_by_default(manifest)
    with pytest.raises(ConfigError, match="executorch graph variants .* not supported yet"
                                          ".* run on onnxruntime"):
        ensure_variant(out, manifest, ("lora", 5))
    assert "lora-r5" not in manifest.variants


def test_lora_variant_decoder_generates_the_references_tokens(bundle):
    """int4, --generate: greedy tokens under the LoRA through its variant's decoder (KV cache,
    codes read in place, branches bound) equal transformers' greedy generate on the reference
    carrying the LoRA (float activations), and are each the argmax (within TOL of the row's
    largest magnitude) of the runtime's own full forward through the variant graph, for the
    bundle as shipped too (int4's activations are quantized per token: a step and the forward
    see the same numbers); not the base's tokens."""
    lm, out, flt, precision, adapters, ref = bundle
    if precision != "int4":
        pytest.skip("the int4 bundle carries the decoder")
    eos = read_manifest(out).extra["generate"]["eos_token_ids"]
    want = reference_greedy(ref, [adapters["lora"]], PROMPT, 10, eos)
    assert len(want) == 10 and want != reference_greedy(ref, [], PROMPT, 10, eos)
    for bundle_dir in (flt, out):
        rt = load(bundle_dir, threads=1)
        rt.switch("lora")
        ids = rt.generate(PROMPT, max_new_tokens=10).ids
        if bundle_dir == flt:
            assert ids == want
        logits = rt.run(input_ids=np.array([PROMPT + ids]))[0]
        for k, token in enumerate(ids):
            row = logits[len(PROMPT) + k - 1]
            assert row[token] >= row.max() - TOL * np.abs(row).max(), (bundle_dir.name, k)
