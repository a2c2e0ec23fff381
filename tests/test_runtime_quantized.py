"""Quantized bundles (``--weights int8|int4``) on ONNX Runtime: switching on codes.

References, each independent of the switch engine and of edgeadapt's kernel: the codes a
switch must leave, computed here from the exported grid (:mod:`edgeadapt.format.quant`) and the
adapter files; the forward with those codes run by stock ONNX Runtime through the graph's own
dequantization (no custom op); the exported codes for every restore."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from runtime_reference import example_pair, register_adapters

from edgeadapt.errors import BundleError, ConfigError
from edgeadapt.export.bundle import export_base
from edgeadapt.format import read_manifest
from edgeadapt.format.fingerprint import weight_sha256
from edgeadapt.format.layout import to_backend
from edgeadapt.format.quant import codes_weight, grid, live_grid
from edgeadapt.format.types import Adapter, LoraDelta, ShiraDelta
from edgeadapt.models import load_model
from edgeadapt.numeric import rel_error
from edgeadapt.runtime import load

PRECISIONS = ("int8", "int4", "int4-affine", "int4-affine-live8")


def _shira(lm, names: list[str], g, density: float, steps: float, rng) -> Adapter:
    """SHiRA on ``names`` at ``density``, deltas N(0, 1) times ``steps`` median grid steps."""
    w = {n: lm.model.get_parameter(n).detach().numpy() for n in names}
    t = {}
    for n in names:
        step = float(np.median(np.abs(g.quantize(codes_weight(w[n], g))[1])))
        idx = np.sort(rng.choice(w[n].size, int(density * w[n].size), replace=False))
        t[n] = ShiraDelta(idx.astype(np.int64),
                          (steps * step * rng.standard_normal(idx.size)).astype(np.float32))
    return Adapter("shira", t, {n: tuple(w[n].shape) for n in names},
                   {n: weight_sha256(w[n]) for n in names})


def _adapters(lm, names: list[str], g) -> dict[str, Adapter]:
    """s1: SHiRA at 5% of every live weight, deltas of about +-3 steps of the grid (int4
    saturates some); s2: 20% of two weights overlapping s1, small deltas; lora: rank 2."""
    rng = np.random.default_rng(4)
    w = {n: lm.model.get_parameter(n).detach().numpy() for n in names}
    lora = {n: LoraDelta((0.1 * rng.standard_normal((2, w[n].shape[1]))).astype(np.float32),
                         (0.1 * rng.standard_normal((w[n].shape[0], 2))).astype(np.float32))
            for n in names[::2]}
    return {"s1": _shira(lm, names, g, 0.05, 3.0, rng),
            "s2": _shira(lm, names[:2], g, 0.2, 0.8, rng),
            "lora": Adapter("lora", lora, {n: tuple(w[n].shape) for n in lora},
                            {n: weight_sha256(w[n]) for n in lora})}


@pytest.fixture(scope="module", params=PRECISIONS)
def bundle(request, tmp_path_factory):
    torch.set_num_threads(1)
    lm = load_model("tiny-smollm2", seed=0)
    out = tmp_path_factory.mktemp(request.param) / "bundle"
    export_base(lm, out, backends="onnxruntime", targets="qv", precision=request.param)
    manifest = read_manifest(out)
    g = live_grid(request.param)  # the live weights' grid (int4-affine-live8: int8)
    adapters = _adapters(lm, sorted(manifest.weights), g)
    register_adapters(out, manifest, adapters)
    return lm, out, g, adapters


def _expected_codes(lm, g, adapters: dict[str, Adapter], active: list[str]) -> dict:
    """Per live weight the codes (out, in) the active adapters must leave: the base's codes,
    each touched entry re-quantized once from the summed scaled deltas (LoRA densely)."""
    out = {}
    for n in next(iter(adapters.values())).targets:
        q, s = g.quantize(codes_weight(lm.model.get_parameter(n).detach().numpy(), g))
        delta = np.zeros(q.size, np.float32)
        touched = np.zeros(q.size, bool)
        for name in active:
            t = adapters[name].targets.get(n)
            if isinstance(t, ShiraDelta):
                np.add.at(delta, t.indices, t.values)
                touched[t.indices] = True
            elif isinstance(t, LoraDelta):
                delta += (t.B @ t.A).reshape(-1)
                touched[:] = True
        new = q.reshape(-1).copy()
        idx = np.flatnonzero(touched)
        new[idx] = g.requantize(q.reshape(-1)[idx], g.scale_at(s, q.shape, idx), delta[idx])[0]
        out[n] = (new.reshape(q.shape), s)
    return out


def _stock_forward(bundle_dir, codes: dict, inputs: dict) -> np.ndarray:
    """The bundle's graph on stock ONNX Runtime (its dequantization, no edgeadapt op) with
    ``codes`` (torch name -> (codes, scales) in torch layout) as its live inputs, and the live
    weights' readers computing with int8 activations as the graph's MatMulNBits do at
    accuracy level 4 (:func:`_quantize_activations`; edgeadapt's kernel quantizes them so, a
    layer's k in its node beside q and v included)."""
    manifest = read_manifest(bundle_dir)
    feeds = dict(inputs)
    for n, (q, s) in codes.items():
        entry = manifest.weights[n].onnxruntime
        feeds[entry["name"]] = to_backend(q, entry["layout"])
        feeds[entry["quant"]["scales"]] = to_backend(s, entry["layout"])
    path = bundle_dir / manifest.onnxruntime["file"]
    model = onnx.load(str(path), load_external_data=False)
    assert {a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
            if a.name == "accuracy_level"} == {4}
    producers = {o: n for n in model.graph.node for o in n.output}
    live = [n for n in model.graph.node
            if n.op_type == "MatMul" and n.input[1] in producers
            and producers[n.input[1]].name.endswith("/dq_shape")]
    _quantize_activations(model.graph, live)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                str(bundle_dir))
    sess = ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def _quantize_activations(graph: onnx.GraphProto, readers: list) -> None:
    """Feed ``readers`` (MatMul nodes, x ``(T, in)`` first) ``A(x)`` in stock ONNX ops, per
    row in blocks of 32 columns as MatMulNBits quantizes its activations at accuracy level 4
    (edgeadapt.models.quantized): ``m = max |x_blk|, rint(x_blk * (127 / m)) * (m / 127)``,
    0 where ``m = 0``. Its nodes follow the producer of each ``x``."""
    from onnx import helper, numpy_helper

    consts = {"aq_blocks": np.array([0, -1, 32], np.int64), "aq_last": np.array([-1], np.int64),
              "aq_127": np.array(127, np.float32), "aq_0": np.array(0, np.float32)}
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
    after: dict[str, list] = {}
    for x in sorted({r.input[0] for r in readers}):
        def o(s: str, x: str = x) -> str:
            return f"{x}/aq_{s}"

        after[x] = [
            helper.make_node("Reshape", [x, "aq_blocks"], [o("b")]),
            helper.make_node("Abs", [o("b")], [o("abs")]),
            helper.make_node("ReduceMax", [o("abs"), "aq_last"], [o("m")], keepdims=1),
            helper.make_node("Div", ["aq_127", o("m")], [o("inv0")]),
            helper.make_node("Greater", [o("m"), "aq_0"], [o("pos")]),
            helper.make_node("Where", [o("pos"), o("inv0"), "aq_0"], [o("inv")]),
            helper.make_node("Mul", [o("b"), o("inv")], [o("scaled")]),
            helper.make_node("Round", [o("scaled")], [o("q")]),  # ties to even
            helper.make_node("Div", [o("m"), "aq_127"], [o("a")]),
            helper.make_node("Mul", [o("q"), o("a")], [o("deq")]),
            helper.make_node("Shape", [x], [o("shape")]),
            helper.make_node("Reshape", [o("deq"), o("shape")], [o("x")])]
    for r in readers:
        r.input[0] = f"{r.input[0]}/aq_x"
    nodes = list(graph.node)
    del graph.node[:]
    for n in nodes:
        graph.node.append(n)
        for out in n.output:
            graph.node.extend(after.get(out, []))


def _equal_but_for_a_flip(got: np.ndarray, want: np.ndarray) -> bool:
    """``got`` equals ``want`` (..., T, out) to 1e-4 of its largest value at every token but at
    most one, which is within 1e-2: the two compute the same int8 activations and products, in
    a different float order (edgeadapt's integer sums against stock ONNX Runtime's float
    MatMul on the dequantized ones), so an activation a later layer quantizes on a rounding tie
    may land one step apart (0.7e-3 and 2.5e-3 downstream seen, in that token alone)."""
    err = np.abs(got - want).max(axis=-1).ravel() / max(float(np.abs(want).max()), 1e-30)
    return int((err > 1e-4).sum()) <= 1 and float(err.max()) < 1e-2


def _codes(rt) -> dict[str, np.ndarray]:
    return {n: lw.torch_weight().copy() for n, lw in rt.store.live_weights().items()}


@pytest.mark.parametrize("active", [["s1"], ["s2"], ["s1", "s2"], ["lora"], ["s1", "lora"]])
def test_switch_writes_requantized_codes_and_runs_them(bundle, active):
    lm, out, g, adapters = bundle
    rt = load(out, mode="live", threads=1)
    assert rt.store.kernel  # the codes are read by edgeadapt's QBlockedMatMul
    for lw in rt.store.live_weights().values():  # int4: two codes per byte (Q4BlockedMatMul)
        assert lw.packed == (g.bits == 4) and lw.array.size == lw.size // (1 + lw.packed)
    rt.switch(active)
    want = _expected_codes(lm, g, adapters, active)
    for n, (q, _) in want.items():
        np.testing.assert_array_equal(_codes(rt)[n], q, err_msg=n)
    _, inputs = example_pair(lm)
    got = rt.run(**inputs)
    assert _equal_but_for_a_flip(got, _stock_forward(out, want, inputs))
    assert rel_error(got, _stock_forward(out, _expected_codes(lm, g, adapters, []),
                                         inputs)) > 1e-3  # the switch changed the output


@pytest.mark.parametrize("native", [True, False])
def test_random_sequences_restore_the_exported_codes_and_report_saturation(bundle, native):
    """native False: numpy's scatter (the fallback without a compiler; on int4 the
    read-modify-write of packed bytes, edgeadapt/format/nibbles.py)."""
    lm, out, g, adapters = bundle
    rt = load(out, mode="live", threads=1)
    rt.engine.native_scatter = native and rt.engine.native_scatter
    check_random_sequences(rt, lm, g, adapters, _codes)


def check_random_sequences(rt, lm, g, adapters: dict[str, Adapter], codes) -> None:
    """25 random switches among :func:`_adapters`' sets, each leaving the expected codes
    (``codes(rt)``: torch name -> codes (out, in) as the backend holds them); s1 on int4
    reports saturated entries; None ends on the exported codes bit for bit (and
    ``verify_base``). Shared with tests/test_executorch_quantized.py."""
    exported = codes(rt)
    rng = np.random.default_rng(0)
    sets = [[], ["s1"], ["s2"], ["s1", "s2"], ["lora"], ["s2", "lora"]]
    for k in rng.integers(0, len(sets), 25):
        rt.switch(sets[k] or None)
        want = _expected_codes(lm, g, adapters, sets[k])
        got = codes(rt)
        assert all(np.array_equal(got[n], q) for n, (q, _) in want.items()), sets[k]
    rt.switch(["s1"])
    if g.name == "int4":  # +-3 steps of a 16-code grid: some entries must clamp
        assert sum(rt.saturated.values()) > 0
    rt.switch(None)
    assert rt.saturated == {}
    got = codes(rt)
    assert all(np.array_equal(got[n], exported[n]) for n in exported)
    rt.engine.verify_base()


def test_kernel_nodes_take_the_activations_of_the_graphs_matmulnbits(bundle):
    """The rewrite gives edgeadapt's quantized nodes the ``accuracy_level`` of the graph's own
    MatMulNBits: 4 (int8 activations) as exported, 0 (float) in the export check's copy
    (``onnx_quant.float_activations``); on int4 it absorbs a layer's k (a MatMulNBits of the
    same x) only at its level: told level 0 on the exported graph, it leaves every k stock;
    with every_constant, every symmetric int4 MatMulNBits it can read (the o, MLP and head
    projections too)."""
    from onnx import helper

    from edgeadapt.export.onnx_quant import float_activations
    from edgeadapt.graphs.quantized import kernel_quantized_matmuls, quantized_inputs

    _, out, g, _ = bundle
    path = out / read_manifest(out).onnxruntime["file"]

    def rewrite(source, level=None) -> tuple[set, int, int]:
        """(levels of the edgeadapt nodes, MatMulNBits before, after)"""
        model = onnx.load(str(source), load_external_data=False)
        before = sum(n.op_type == "MatMulNBits" for n in model.graph.node)
        codes = set(quantized_inputs(model))
        assert kernel_quantized_matmuls(model, codes, codes if g.bits == 4 else set(), out,
                                        accuracy_level=level).replaced
        levels = {helper.get_attribute_value(a) for n in model.graph.node
                  if n.domain == "edgeadapt" and n.op_type.endswith("BlockedMatMul")
                  for a in n.attribute if a.name == "accuracy_level"}
        return levels, before, sum(n.op_type == "MatMulNBits" for n in model.graph.node)

    with float_activations(path) as copy:
        for source, level in ((path, 4), (copy, 0)):
            levels, before, after = rewrite(source)
            assert levels == {level}
            if g.name == "int4":
                assert after < before  # the layers' k joined the live q and v
            if source == path:
                live_only = after
    levels, before, after = rewrite(path, 0)
    assert levels == {0} and after == before
    if g.name == "int4":  # every_constant (the decoder's sessions): each MatMulNBits it can read
        from edgeadapt.graphs.quantized import _int4_constant

        model = onnx.load(str(path), load_external_data=False)
        codes = set(quantized_inputs(model))
        kernel_quantized_matmuls(model, codes, codes, out, every_constant=True)
        inits = {i.name: i for i in model.graph.initializer}
        left = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
        assert len(left) < live_only and all(
            _int4_constant(n, inits, set(), out) is None for n in left)


def test_live_weights_are_the_dequantized_values(bundle):
    lm, out, g, _ = bundle
    rt = load(out, mode="live", threads=1)
    for n, w in rt.live_weights().items():
        # an affine grid's live weights are W' (the offsets are constants of the graph)
        want = g.dequantize(*g.quantize(codes_weight(lm.model.get_parameter(n).detach().numpy(),
                                                     g)))
        np.testing.assert_array_equal(w, want)


def test_live_store_holds_the_bundles_codes_packed_before_its_one_copy(bundle, monkeypatch):
    """The live store's codes are the bundle's, bit for bit: int4 two per byte
    (format/nibbles.py), packed before the one arena copy, which holds them so and only so (no
    arena of a code per byte first); int8 a code per byte. The codes' sha256 is checked on the
    unpacked codes (``verify_base``)."""
    from safetensors.numpy import load_file

    from edgeadapt.format import nibbles
    from edgeadapt.runtime.backends.onnxruntime import store as ort_store
    from edgeadapt.runtime.pages import one_span

    _, out, g, _ = bundle
    copied = []

    def spy(arrays):
        copied.append({n: a.dtype for n, a in arrays.items()})
        return arena_copies(arrays)

    arena_copies = ort_store.arena_copies
    monkeypatch.setattr(ort_store, "arena_copies", spy)
    rt = load(out, mode="live", threads=1)
    assert rt.store.kernel
    manifest = read_manifest(out)
    packed = g.bits == 4
    assert copied == [{n: np.dtype(np.uint8 if packed else np.int8) for n in manifest.weights}]
    tensors = load_file(str(out / manifest.onnxruntime["live_weights"]))
    live = rt.store.live_weights()
    for n, lw in live.items():
        entry = manifest.weights[n].onnxruntime
        codes = tensors.get(entry["name"], tensors.get(n))
        if codes.shape == tuple(manifest.weights[n].shape):  # stored in torch layout
            codes = to_backend(codes, entry["layout"])
        assert lw.packed == packed and lw.array.dtype == (np.uint8 if packed else np.int8)
        np.testing.assert_array_equal(nibbles.unpack(lw.array) if packed else lw.array, codes)
        assert weight_sha256(lw.torch_weight()) == lw.codes.codes_sha256
    assert one_span({n: lw.array for n, lw in live.items()}) is not None
    rt.engine.verify_base()


def test_bad_scales_and_modes_are_refused(bundle, tmp_path):
    import shutil

    from safetensors.numpy import load_file, save_file

    _, out, _, _ = bundle
    with pytest.raises(ConfigError, match="mode='live' only"):
        load(out, mode="repack")
    manifest = read_manifest(out)
    entry = next(iter(manifest.weights.values())).onnxruntime
    for bad in (0.0, np.nan):
        copy = tmp_path / f"b{bad}"
        shutil.copytree(out, copy)
        path = copy / manifest.onnxruntime["live_weights"]
        tensors = load_file(str(path))
        tensors[entry["quant"]["scales"]].reshape(-1)[3] = bad
        save_file(tensors, str(path))
        with pytest.raises(BundleError, match="zero or not finite"):
            load(copy, mode="live")


def test_export_refuses_an_unknown_precision(tmp_path):
    # (ExecuTorch exports quantized bundles too: tests/test_executorch_quantized.py)
    with pytest.raises(ConfigError, match="int3"):
        export_base("tiny-smollm2", tmp_path / "y", backends="onnxruntime", precision="int3")


@pytest.fixture(scope="module")
def generate_bundle(tmp_path_factory):
    """Tiny SmolLM2 exported int4 with its KV-cache decoder, and a strong SHiRA adapter
    (half of every live weight, +-8 steps: it changes the greedy tokens; many entries clamp)
    registered as "big"."""
    from generate_bundle import export_generate

    torch.set_num_threads(1)
    lm = load_model("tiny-smollm2", seed=0)
    out = export_generate(lm, tmp_path_factory.mktemp("gen") / "bundle", max_context=64,
                          precision="int4")
    manifest = read_manifest(out)
    big = _shira(lm, sorted(manifest.weights), grid("int4"), 0.5, 8.0,
                 np.random.default_rng(9))
    register_adapters(out, manifest, {"big": big})
    return lm, out, {"big": big}


def test_quantized_decoder_generates_the_stock_forwards_argmax(generate_bundle):
    """Greedy tokens through the int4 decoder (KV cache, edgeadapt's kernel on the codes),
    base and "big" fused, for a prompt whose next token the adapter changes: each is the
    argmax (within 1e-4 of the top logit) of stock ONNX Runtime's full forward over the whole
    context, run on the re-quantized codes computed here (int4's activations are quantized per
    token, so a step and the forward see the same numbers). The decoder shares the forward's
    code buffers: a switch reaches both."""
    lm, out, adapters = generate_bundle
    check_greedy_is_argmax(load(out, mode="live", threads=1), lm, adapters,
                           lambda c, ids: _stock_forward(out, c, {"input_ids": ids}), 1e-4, 10)


def check_greedy_is_argmax(rt, lm, adapters: dict[str, Adapter], forward, tol: float,
                           new_tokens: int) -> None:
    """For a prompt whose next token "big" changes (under ``forward(codes, ids)``: a reference
    forward (1, T, vocab) on ``codes`` from :func:`_expected_codes`), greedy tokens of ``rt``
    base and with "big" fused are each the argmax, within ``tol`` of the row's largest
    magnitude, of ``forward`` over the whole context; "big" saturates. Shared with
    tests/test_executorch_quantized.py."""
    codes = [_expected_codes(lm, grid("int4"), adapters, a) for a in ([], ["big"])]
    rng = np.random.default_rng(0)
    for _ in range(50):  # a prompt whose next token the adapter changes
        prompt = [int(i) for i in rng.integers(5, lm.vocab_size, 6)]
        first = [forward(c, np.array([prompt]))[0, -1].argmax() for c in codes]
        if first[0] != first[1]:
            break
    assert first[0] != first[1]
    for active, want in zip(([], ["big"]), codes, strict=True):
        rt.switch(active or None)
        ids = rt.generate(prompt, max_new_tokens=new_tokens).ids
        logits = forward(want, np.array([prompt + ids]))[0]
        for k, token in enumerate(ids):
            row = logits[len(prompt) + k - 1]
            assert row[token] >= row.max() - tol * np.abs(row).max(), (active, k)
    assert sum(rt.saturated.values()) > 0
