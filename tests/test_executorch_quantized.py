"""Quantized bundles (``--weights int8|int4``) on ExecuTorch: the rest on XNNPACK's quantized
linears (torchao), the live q/v weights as int8 codes + scales buffers read in place by
``edgeadapt::live_qlinear_a8.out`` (int4: ``live_q4linear_a8.out``, int8 activations),
switched on codes by the engine.

References, independent of the switch engine and of edgeadapt's kernel: the codes a switch
must leave, from the grid and the adapter files (``_expected_codes`` of
tests/test_runtime_quantized.py, shared with ONNX Runtime); the forward on those codes by
PyTorch, two ways: (a) the program's own PyTorch model (torchao's quantized linears computed
eagerly, their per-token int8 activations included, and the live linears' blockwise ones) with
the codes written into it, which the program must match within the rounding of a few
activations, and (b) every quantized weight dequantized with float activations, which differs
by what quantizing the activations costs (measured tolerances below). Exports: a one-block
Llama (hidden 64: two groups of 32 per row) for both backends, about 45 s per precision on the
shared machine."""

from __future__ import annotations

import copy
import dataclasses
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("executorch")
pytest.importorskip("torchao")

from runtime_reference import register_adapters  # noqa: E402
from test_runtime_executorch import one_block_llama  # noqa: E402
from test_runtime_quantized import (  # noqa: E402
    _adapters,
    _expected_codes,
    check_greedy_is_argmax,
    check_random_sequences,
)

from edgeadapt.errors import BundleError, ConfigError  # noqa: E402
from edgeadapt.export.bundle import export_base  # noqa: E402
from edgeadapt.export.executorch_quant import (  # noqa: E402
    dequantized_rest,
    quantized_live_model,
)
from edgeadapt.format import nibbles, read_manifest  # noqa: E402
from edgeadapt.format.quant import grid  # noqa: E402
from edgeadapt.models import LoadedModel, LogitsModule  # noqa: E402
from edgeadapt.numeric import rel_error  # noqa: E402
from edgeadapt.runtime import load  # noqa: E402

pytestmark = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("c++", "g++", "clang++")), reason="no C++ compiler")

#: (a) the program against its own PyTorch model on the same codes: median 3e-7, at most
#: 9.6e-4 (int4 under s1; 2.2e-3 on a sibling model with a 96-wide MLP): XNNPACK (or the live
#: kernel) rounds an activation to the neighbouring int8 code now and then, where the eager
#: quantization does not
SAME_MODEL_TOL = 5e-3
#: (b) against float activations on the dequantized weights (torchao's rest, the live codes):
#: what the rest's per-token and the live weights' blockwise int8 activations cost; measured
#: 2.6e-3 to 4.3e-3 (int8), 2.4e-3 to 4.2e-3 (int4)
FLOAT_ACT_TOL = 1e-2


# int8 (55 s of export) runs in make test-slow; int4 in the default run
@pytest.fixture(scope="module", params=(pytest.param("int8", marks=pytest.mark.slow), "int4"))
def bundle(request, tmp_path_factory):
    torch.set_num_threads(1)
    lm = one_block_llama(hidden=64)
    out = tmp_path_factory.mktemp(request.param) / "bundle"
    export_base(lm, out, backends=("onnxruntime", "executorch"), targets="qv",
                precision=request.param)
    manifest = read_manifest(out)
    g = grid(request.param)
    adapters = _adapters(lm, sorted(manifest.weights), g)
    register_adapters(out, manifest, adapters)
    live = sorted(manifest.weights)
    program_model, _ = quantized_live_model(lm, live, request.param)
    return lm, out, g, adapters, program_model, dequantized_rest(lm, program_model, live)


def _inputs(lm, batch: int = 2, seq: int = 7) -> dict[str, np.ndarray]:
    from edgeadapt.models import example_inputs

    return {k: v.numpy() for k, v in example_inputs(lm, batch=batch, seq=seq, seed=3).items()}


def same_model_forward(program_model: LoadedModel, codes: dict, inputs) -> np.ndarray:
    """(a): the program's PyTorch model (torchao's rest) with ``codes`` (torch name ->
    (codes, scales)) in its live buffers."""
    model = copy.deepcopy(program_model.model)
    for n, (q, _) in codes.items():
        model.get_submodule(n.removesuffix(".weight")).set_codes(q)
    with torch.no_grad():
        return LogitsModule(dataclasses.replace(program_model, model=model))(
            **{k: torch.from_numpy(v) for k, v in inputs.items()}).numpy()


def float_forward(lm: LoadedModel, rest: dict, g, codes: dict, inputs) -> np.ndarray:
    """(b): ``lm`` with every quantized weight dequantized (the rest as torchao holds it, the
    live ones ``codes`` on the grid), float activations."""
    model = copy.deepcopy(lm.model)
    values = {**rest, **{n: g.dequantize(q, s) for n, (q, s) in codes.items()}}
    for n, arr in values.items():
        model.get_submodule(n.removesuffix(".weight")).weight = torch.nn.Parameter(
            torch.from_numpy(np.ascontiguousarray(arr, np.float32)), requires_grad=False)
    with torch.no_grad():
        return LogitsModule(dataclasses.replace(lm, model=model))(
            **{k: torch.from_numpy(v) for k, v in inputs.items()}).numpy()


def _codes(rt) -> dict[str, np.ndarray]:
    """The codes as the loaded program holds them, read through fresh ``get_attribute`` views
    (not the arrays the engine writes)."""
    return {n: rt.store.read_back(n) for n in rt.store.live_weights()}


@pytest.mark.parametrize("active", [[], ["s1"], ["s2"], ["s1", "s2"], ["lora"]])
def test_switch_writes_requantized_codes_and_runs_them(bundle, active):
    lm, out, g, adapters, program_model, rest = bundle
    rt = load(out, backend="executorch", mode="live")
    assert rt.store.kernel
    manifest = read_manifest(out)
    for n, lw in rt.store.live_weights().items():  # int4: two codes per byte (live_q4linear)
        assert lw.packed == (g.bits == 4) == manifest.weights[n].executorch["quant"]["packed"]
        assert lw.array.nbytes == lw.size // (1 + lw.packed)
        assert manifest.weights[n].executorch["quant"]["activations"] == "int8"  # hidden 64
    rt.switch(active or None)
    want = _expected_codes(lm, g, adapters, active)
    got_codes = _codes(rt)
    for n, (q, _) in want.items():
        np.testing.assert_array_equal(got_codes[n], q, err_msg=n)
    for b, s in ((1, 1), (2, 7), (1, 64)):
        inputs = _inputs(lm, b, s)
        got = rt.run(**inputs)
        err_a = rel_error(got, same_model_forward(program_model, want, inputs))
        err_b = rel_error(got, float_forward(lm, rest, g, want, inputs))
        assert err_a <= SAME_MODEL_TOL, (b, s, err_a)
        assert err_b <= FLOAT_ACT_TOL, (b, s, err_b)
    if active:  # the switch changed the output, by more than the references' distance
        inputs = _inputs(lm)
        got = rt.run(**inputs)
        base = same_model_forward(program_model, _expected_codes(lm, g, adapters, []), inputs)
        assert rel_error(got, base) > max(1e-3, 4 * rel_error(
            got, same_model_forward(program_model, want, inputs)))


def test_codes_edited_in_place_are_read(bundle):
    """A byte written into the codes array the store hands out is what the next run reads
    (a packed copy would hide it), at one token (the GEMV) and at 2 x 7 (the slabs). The v
    weight: at one token attention ignores q. int4: the array is the program's codes two per
    byte (format/nibbles.py), edited byte by byte here: the low nibbles of each row's first 8
    bytes (columns 0..7) and their high nibbles (columns 16..23), both read by the kernel."""
    lm, out, g, _, program_model, _ = bundle
    rt = load(out, backend="executorch", mode="live")
    codes = {n: (lw.torch_weight().copy(), lw.codes.scales)
             for n, lw in rt.store.live_weights().items()}
    shapes = ((1, 1), (2, 7))
    before = [rt.run(**_inputs(lm, b, s)) for b, s in shapes]
    n = next(n for n in sorted(codes) if "v_proj" in n)
    lw = rt.store.live_weights()[n]
    arr = lw.array
    assert lw.packed == (g.bits == 4)
    want = codes[n][0].copy()
    cols = np.r_[0:8, 16:24] if lw.packed else np.r_[0:8]
    want[:, cols] = np.where(want[:, cols] > 0, g.qmin, g.qmax)
    if lw.packed:
        nib = (want[:, cols].astype(np.int16) + 8).astype(np.uint8)
        arr[:, 0, :8] = nib[:, :8] | (nib[:, 8:] << 4)
    else:
        arr[:, cols] = want[:, cols]
    codes[n] = (want, codes[n][1])
    for (b, s), was in zip(shapes, before, strict=True):
        inputs = _inputs(lm, b, s)
        after = rt.run(**inputs)
        assert rel_error(after, was) > 1e-2, (b, s)
        assert rel_error(after, same_model_forward(program_model, codes, inputs)) \
            <= SAME_MODEL_TOL, (b, s)
    np.testing.assert_array_equal(rt.store.read_back(n), want)
    np.testing.assert_array_equal(rt.store.read_back(n, raw=True), arr)


def test_random_sequences_restore_the_exported_codes_and_report_saturation(bundle):
    lm, out, g, adapters, _, _ = bundle
    check_random_sequences(load(out, backend="executorch", mode="live"), lm, g, adapters,
                           _codes)


def _exported_bytes(lm, g, names) -> dict[str, np.ndarray]:
    """The bytes the export writes into each live codes buffer: the grid's codes of the base
    weight, packed two per byte on int4 (format/nibbles.py, the as-is layout's blocks of 32)."""
    out = {}
    for n in names:
        q = g.quantize(lm.model.get_parameter(n).detach().numpy())[0]
        out[n] = nibbles.pack(q.reshape(q.shape[0], -1, nibbles.BLOCK)) if g.bits == 4 else q
    return out


def test_switches_restore_the_exported_bytes_bit_for_bit(bundle):
    """The buffers the loaded program reads (fresh ``get_attribute`` views, as held: packed
    bytes on int4) start as the export's bytes, change under each adapter set, and a switch
    back to the base leaves them, and the forward, bit for bit as exported: every nibble
    written through the engine's read-modify-write of its byte (runtime/scatter.py)."""
    lm, out, g, _, _, _ = bundle
    rt = load(out, backend="executorch", mode="live")
    names = sorted(rt.store.live_weights())
    want = _exported_bytes(lm, g, names)
    held = {n: rt.store.read_back(n, raw=True) for n in names}
    for n in names:
        assert held[n].dtype == (np.uint8 if g.bits == 4 else np.int8)
        np.testing.assert_array_equal(held[n], want[n], err_msg=n)
    inputs = _inputs(lm, 2, 7)
    before = rt.run(**inputs)
    for active in (["s1"], ["s1", "s2"], ["lora"], ["s2", "lora"]):
        rt.switch(active)
        assert any(not np.array_equal(rt.store.read_back(n, raw=True), want[n])
                   for n in names), active
        rt.switch(None)
        for n in names:
            np.testing.assert_array_equal(rt.store.read_back(n, raw=True), want[n],
                                          err_msg=f"{active} {n}")
        assert np.array_equal(rt.run(**inputs), before), active
    rt.engine.verify_base()


def test_live_weights_are_the_dequantized_values(bundle):
    """... and every other GEMM is XNNPACK's (the rest's quantized linears delegated)."""
    lm, out, g, _, _, _ = bundle
    section = read_manifest(out).executorch
    assert section["precision"] == g.name and section["undelegated_gemms"] == 0
    assert section["repack"] is None
    rt = load(out, backend="executorch", mode="live")
    for n, w in rt.live_weights().items():
        want = g.dequantize(*g.quantize(lm.model.get_parameter(n).detach().numpy()))
        np.testing.assert_array_equal(w, want)


def test_bad_scales_and_modes_are_refused(bundle, tmp_path):
    """Scales zero or NaN inside the program (their initial buffer data, found by value):
    BundleError at load naming the weight; repack mode: ConfigError."""
    lm, out, g, _, _, _ = bundle
    with pytest.raises(ConfigError, match="mode='live' only"):
        load(out, backend="executorch", mode="repack")
    manifest = read_manifest(out)
    name = sorted(manifest.weights)[0]
    scales = g.quantize(lm.model.get_parameter(name).detach().numpy())[1]
    blob = (out / manifest.executorch["file"]).read_bytes()
    held = scales.tobytes()
    assert blob.count(held) >= 1  # each method that reads the buffer holds its initial data
    for bad in (0.0, np.nan):
        copy_dir = tmp_path / f"b{bad}"
        shutil.copytree(out, copy_dir)
        edited = bytearray(held)
        edited[12:16] = np.float32(bad).tobytes()
        edited = blob.replace(held, bytes(edited))
        (copy_dir / manifest.executorch["file"]).write_bytes(edited)
        with pytest.raises(BundleError, match=f"{name}.*zero or not finite"):
            load(copy_dir, backend="executorch", mode="live")


def test_a_packed_record_that_does_not_match_the_program_is_refused(bundle, tmp_path):
    """bundle.json's ``packed`` against the buffer the program holds (uint8 packed codes, int8
    a code per byte): BundleError at load naming the weight."""
    import json

    _, out, g, _, _, _ = bundle
    copy_dir = tmp_path / "b"
    shutil.copytree(out, copy_dir)
    data = json.loads((copy_dir / "bundle.json").read_text())
    name = sorted(data["weights"])[0]
    quant = data["weights"][name]["executorch"]["quant"]
    quant["packed"] = not quant["packed"]
    (copy_dir / "bundle.json").write_text(json.dumps(data))
    held = "uint8" if g.bits == 4 else "int8"
    with pytest.raises(BundleError, match=f"{name}.* is {held}, but bundle.json says it holds"):
        load(copy_dir, backend="executorch", mode="live")


@pytest.mark.slow  # a third export (20 s); int8 bundles take the same one-byte store path
def test_an_int4_bundle_of_a_code_per_byte_loads_and_switches(tmp_path, monkeypatch):
    """Bundles exported before int4 codes were packed: their int4 buffers hold a code per byte
    (int8, ``live_qlinear``) and their ``quant`` records say nothing of packing. They load
    unpacked and switch on those bytes as before."""
    import json

    from edgeadapt.export import executorch_quant

    torch.set_num_threads(1)
    monkeypatch.setattr(executorch_quant, "packs", lambda g: False)
    lm = one_block_llama(hidden=64)
    out = tmp_path / "bundle"
    export_base(lm, out, backends="executorch", targets="qv", precision="int4")
    data = json.loads((out / "bundle.json").read_text())
    for entry in data["weights"].values():
        assert entry["executorch"]["quant"].pop("packed") is False
    (out / "bundle.json").write_text(json.dumps(data))
    manifest = read_manifest(out)
    g = grid("int4")
    adapters = _adapters(lm, sorted(manifest.weights), g)
    register_adapters(out, manifest, adapters)
    rt = load(out, backend="executorch", mode="live")
    for lw in rt.store.live_weights().values():
        assert not lw.packed and lw.array.dtype == np.int8 and lw.array.shape == lw.shape
    program_model = quantized_live_model(lm, sorted(manifest.weights), "int4")[0]
    rt.switch(["s1", "s2"])
    want = _expected_codes(lm, g, adapters, ["s1", "s2"])
    for n, (q, _) in want.items():
        np.testing.assert_array_equal(rt.store.read_back(n), q, err_msg=n)
    for b, s in ((1, 1), (2, 7)):
        inputs = _inputs(lm, b, s)
        assert rel_error(rt.run(**inputs), same_model_forward(program_model, want, inputs)) \
            <= SAME_MODEL_TOL, (b, s)
    rt.switch(None)
    rt.engine.verify_base()


def test_export_refuses_what_quantized_programs_lack(tmp_path):
    with pytest.raises(ConfigError, match="own kernel only"):
        export_base(one_block_llama(hidden=64), tmp_path / "a", backends="executorch",
                    precision="int8", pte_live_form="weight-left")


def test_graph_variants_of_a_quantized_bundle_are_refused(bundle):
    from edgeadapt.export.adapter import ensure_variant

    _, out, _, _, _, _ = bundle
    with pytest.raises(ConfigError, match="quantized bundle are not supported yet"):
        ensure_variant(out, read_manifest(out), ("lora", 2))


def test_both_backends_hold_the_same_codes(bundle):
    """One grid for both backends: the exported codes and, after a fused switch, the
    re-quantized ones are the same bytes on ONNX Runtime and ExecuTorch."""
    _, out, _, _, _, _ = bundle
    manifest = read_manifest(out)
    for entry in manifest.weights.values():
        assert entry.executorch["quant"]["codes_sha256"] == \
            entry.onnxruntime["quant"]["codes_sha256"]
    et = load(out, backend="executorch", mode="live")
    ort = load(out, backend="onnxruntime", mode="live", threads=1)
    for rt in (et, ort):
        rt.switch(["s1", "s2"])
    held = [{n: lw.torch_weight() for n, lw in rt.store.live_weights().items()}
            for rt in (et, ort)]
    assert all(np.array_equal(held[0][n], held[1][n]) for n in held[0])
    assert et.saturated == ort.saturated


@pytest.fixture(scope="module")
def generate_bundle(tmp_path_factory):
    """Tiny SmolLM2 exported int4 for ExecuTorch with its KV-cache decoder (the ``decode``
    method of the same program), and a strong SHiRA adapter "big" (half of every live weight,
    +-8 steps: it changes the greedy tokens; many entries clamp)."""
    from generate_bundle import export_generate
    from test_runtime_quantized import _shira

    from edgeadapt.models import load_model

    torch.set_num_threads(1)
    lm = load_model("tiny-smollm2", seed=0)
    out = export_generate(lm, tmp_path_factory.mktemp("gen") / "bundle", max_context=64,
                          backends="executorch", precision="int4")
    manifest = read_manifest(out)
    live = sorted(manifest.weights)
    big = _shira(lm, live, grid("int4"), 0.5, 8.0, np.random.default_rng(9))
    register_adapters(out, manifest, {"big": big})
    return lm, out, {"big": big}, quantized_live_model(lm, live, "int4")[0]


@pytest.mark.slow  # its decode-method export takes 100 s; the ONNX Runtime twin runs by default
def test_quantized_decoder_generates_the_forwards_argmax(generate_bundle):
    """Greedy tokens through the int4 ``decode`` method (KV cache, edgeadapt's kernel on the
    codes), base and "big" fused, for a prompt whose next token the adapter changes: each is
    the argmax (within the program's tolerance of the top logit) of the program's own PyTorch
    model's full forward over the whole context on the re-quantized codes computed here. The
    decoder reads the forward's code buffers: a switch reaches both."""
    lm, out, adapters, program_model = generate_bundle
    check_greedy_is_argmax(
        load(out, backend="executorch", mode="live"), lm, adapters,
        lambda c, ids: same_model_forward(program_model, c, {"input_ids": ids}),
        SAME_MODEL_TOL, 8)
