"""ONNX export of the tiny models: parity with PyTorch, live weights edited in place, the stale
output of prepacked constants, and the LoRA / SiRA branch variants.

Every reference is an independent PyTorch model (a deep copy carrying the same edit or the fused
adapter), never the exporter's own numbers.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from safetensors.numpy import load_file

from edgeadapt.adapters.base import replace_module
from edgeadapt.adapters.sira.layer import SiraLinear, route
from edgeadapt.adapters.sira.model import insert_sira
from edgeadapt.export.onnx import export_onnx
from edgeadapt.export.onnx_check import BoundSession, session
from edgeadapt.format.types import SiraBranch
from edgeadapt.graphs.blocked import unblock_live_matmuls
from edgeadapt.models import example_inputs, forward, load_model, target_weight_names
from edgeadapt.numeric import rel_error as max_rel_error

RTOL = 1e-4
FAST = [("tiny-minilm", "all")]  # tiny-smollm2 q/v: the smollm2_qv fixture below
SLOW = [("tiny-smollm2", "all"), ("tiny-minilm", "qv")]

torch.set_num_threads(1)


def _export(tmp_path_factory, name, spec, branch=None, out=None, **kw):
    lm = load_model(name)
    live = target_weight_names(lm.model, spec)
    out = out or tmp_path_factory.mktemp(f"{name}-{spec}")
    return lm, live, out, export_onnx(lm, out, live, branch, **kw)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, request):
    return _export(tmp_path_factory, *request.param)


@pytest.fixture(scope="module")
def smollm2_qv(tmp_path_factory):
    """tiny-smollm2, q/v live, base graph plus the LoRA variant in the same folder."""
    lm, live, out, base = _export(tmp_path_factory, "tiny-smollm2", "qv")
    lora = export_onnx(lm, out, live, ("lora", 4), check=False)
    return lm, live, out, base, lora


def _np(inputs):
    return {k: v.numpy() for k, v in inputs.items()}


def _torch_ref(lm, inputs):
    with torch.no_grad():
        return forward(lm, inputs).numpy()


def _check_export(lm, live, out, res):
    """Shared checks of a base export: files, layout by value, constants kept, parity, in-place
    edits seen by the next run."""
    sec, weights = res["section"], res["weights"]
    proto = onnx.load(str(out / sec["file"]), load_external_data=False)
    assert proto.ir_version <= 13
    assert sec["parity"]["max_rel_error"] <= RTOL
    params = dict(lm.model.named_parameters())
    inputs = {i.name for i in proto.graph.input}
    assert set(weights) == set(live)
    # Base values in backend layout, checked against torch directly (not through our mapping).
    stored = load_file(str(out / sec["live_weights_file"]))
    assert set(stored) == {w["name"] for w in weights.values()}
    for name, w in weights.items():
        W = params[name].detach().numpy()
        expected = {"as-is": W, "transposed": W.T,  # blocked32: 32-row slabs, transposed
                    "blocked32": np.stack([W[b:b + 32].T for b in range(0, len(W), 32)])
                    if len(W) % 32 == 0 else None}[w["layout"]]
        np.testing.assert_array_equal(stored[w["name"]], expected)
        assert w["name"] in inputs and list(expected.shape) == w["shape"]
    # Every non-live Linear weight of the blocks is still a constant initializer.
    full = onnx.load(str(out / sec["file"]))
    init_values = [numpy_helper.to_array(i) for i in full.graph.initializer if len(i.dims) == 2]
    for name in target_weight_names(lm.model, "all"):
        if name not in live:
            W = params[name].detach().numpy()
            assert any(np.array_equal(v, W) or np.array_equal(v, W.T) for v in init_values)
    # Parity at an unseen shape, then an in-place random 2% edit of every live buffer.
    bound = BoundSession(session(out / sec["file"]), {k: v.copy() for k, v in stored.items()})
    inputs_t = example_inputs(lm, batch=2, seq=7, seed=11)
    assert max_rel_error(bound.run(_np(inputs_t)), _torch_ref(lm, inputs_t)) <= RTOL
    edited = copy.deepcopy(lm)
    eparams = dict(edited.model.named_parameters())
    rng = np.random.default_rng(0)
    for name, w in weights.items():
        buf = bound.buffers[w["name"]].reshape(-1)
        j = rng.choice(buf.size, size=max(1, buf.size // 50), replace=False)
        d = rng.standard_normal(j.size).astype(np.float32) * 0.2
        buf[j] += d  # in place: the bound OrtValue aliases this buffer
        n_out, n_in = params[name].shape  # ONNX flat j -> torch (row, col), per the docstring
        rows, cols = {"as-is": (j // n_in, j % n_in), "transposed": (j % n_out, j // n_out),
                      # blocked32: j = b * in * 32 + c * 32 + lane, row 32 b + lane, column c
                      "blocked32": (j // (n_in * 32) * 32 + j % 32, j % (n_in * 32) // 32),
                      }[w["layout"]]
        with torch.no_grad():
            eparams[name][torch.from_numpy(rows), torch.from_numpy(cols)] += torch.from_numpy(d)
    got, ref = bound.run(_np(inputs_t)), _torch_ref(edited, inputs_t)
    assert max_rel_error(got, ref) <= RTOL
    assert max_rel_error(got, _torch_ref(lm, inputs_t)) > 1e-3  # the edit mattered


@pytest.mark.parametrize("exported", FAST, indirect=True, ids=lambda p: "-".join(p))
def test_base_parity_and_live_edits(exported):
    _check_export(*exported)


@pytest.mark.slow
@pytest.mark.parametrize("exported", SLOW, indirect=True, ids=lambda p: "-".join(p))
def test_base_parity_and_live_edits_slow(exported):
    _check_export(*exported)


def test_base_parity_smollm2_qv(smollm2_qv):
    _check_export(*smollm2_qv[:4])


def test_prepacked_constants_go_stale(smollm2_qv):
    """The negative control: with the live weights put back as constant initializers supplied
    through ``add_initializer`` (aliasing a numpy buffer) and prepacking on, an in-place edit of
    that buffer does NOT change the output — the stale result the tests above would catch. With
    prepacking off the same edit is seen, so the buffer really is shared."""
    lm, _, out, base, _ = smollm2_qv
    stored = load_file(str(out / base["section"]["live_weights_file"]))
    proto = onnx.load(str(out / "model.onnx"))
    # ONNX Runtime prepacks 2-D MatMul weights only: blocked32 inputs go back to (in, out)
    renamed = unblock_live_matmuls(proto, set(stored))
    stored = {renamed.get(k, k): (np.ascontiguousarray(v.transpose(1, 0, 2).reshape(v.shape[1], -1))
                                  if k in renamed else v) for k, v in stored.items()}
    names = set(stored)
    kept = [i for i in proto.graph.input if i.name not in names]
    del proto.graph.input[:]
    proto.graph.input.extend(kept)
    for name, value in stored.items():  # placeholder initializers, overridden below
        proto.graph.initializer.append(numpy_helper.from_array(np.zeros_like(value), name))
    inputs = example_inputs(lm, batch=4, seq=6, seed=5)
    feeds = _np(inputs)
    outputs = {}
    for prepack in ("0", "1"):
        bufs = {k: v.copy() for k, v in stored.items()}
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        if prepack == "0":
            opts.add_session_config_entry("session.disable_prepacking", "1")
        values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in bufs.items()}
        for k, v in values.items():
            opts.add_initializer(k, v)
        sess = ort.InferenceSession(proto.SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])
        before = sess.run(None, feeds)[0]
        for buf in bufs.values():
            buf *= 1.5  # in place
        outputs[prepack] = (before, sess.run(None, feeds)[0])
    base_ref = _torch_ref(lm, inputs)
    before, after = outputs["1"]
    assert max_rel_error(before, base_ref) <= RTOL
    np.testing.assert_array_equal(after, before)  # stale: the packed copy was used
    assert max_rel_error(outputs["0"][1], before) > 1e-3  # unpacked: the edit is seen


def test_report_constant_copy_prepacks_2d_weights_and_matches_torch(smollm2_qv):
    """onnx_report's all-constant reference: blocked32 live inputs become 2-D (in, out)
    constants read by plain MatMuls (what ORT prepacks), with the model's output unchanged."""
    from experiments.onnx_report import constant_copy

    lm, _, out, base, _ = smollm2_qv
    assert {w["layout"] for w in base["weights"].values()} == {"blocked32"}
    blob = constant_copy(out / "model.onnx", out / base["section"]["live_weights_file"])
    proto = onnx.load_from_string(blob)
    names = {w["name"] for w in base["weights"].values()}
    assert not names & {i.name for i in proto.graph.input}
    assert all(len(i.dims) == 2 for i in proto.graph.initializer if i.name.endswith(".T"))
    inputs = example_inputs(lm, batch=2, seq=5, seed=3)
    sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    assert max_rel_error(sess.run(None, _np(inputs))[0], _torch_ref(lm, inputs)) <= RTOL


def test_lora_variant_matches_fused_torch(smollm2_qv):
    lm, live, out, base, res = smollm2_qv
    sec = res["section"]
    assert sec["file"] == "model.lora-r4.onnx"
    assert "model.onnx.data" in sec["data"]  # base constants shared with model.onnx
    assert sec["live_weights_file"] == base["section"]["live_weights_file"]
    assert set(sec["branch_inputs"]) == set(live)
    stored = load_file(str(out / sec["live_weights_file"]))
    sess = session(out / sec["file"])
    params = dict(lm.model.named_parameters())
    rng = np.random.default_rng(1)
    inputs = example_inputs(lm, batch=3, seq=5, seed=3)
    for rank in (4, 2):
        lora, fused = {}, copy.deepcopy(lm)
        fparams = dict(fused.model.named_parameters())
        for w, names in sec["branch_inputs"].items():
            out_f, in_f = params[w].shape
            A = rng.standard_normal((rank, in_f)).astype(np.float32) * 0.3
            B = rng.standard_normal((out_f, rank)).astype(np.float32) * 0.3
            lora[names["A"]], lora[names["B"]] = A, B
            with torch.no_grad():
                fparams[w] += torch.from_numpy(B @ A)
        feeds = {**_np(inputs), **stored}
        ref = _torch_ref(fused, inputs)
        assert max_rel_error(sess.run(None, {**feeds, **lora})[0], ref) <= RTOL
        padded = {k: np.pad(v, ((0, 4 - rank), (0, 0)) if k.endswith("lora_A")
                            else ((0, 0), (0, 4 - rank))) for k, v in lora.items()}
        assert max_rel_error(sess.run(None, {**feeds, **padded})[0], ref) <= RTOL
    # Without branch feeds the zero-rank defaults give the base model.
    base_out = sess.run(None, {**_np(inputs), **stored})[0]
    assert max_rel_error(base_out, _torch_ref(lm, inputs)) <= RTOL


def test_lora_variant_drives_ort_adapter_api(smollm2_qv, tmp_path):
    lm, _, out, _, res = smollm2_qv
    sec = res["section"]
    stored = load_file(str(out / sec["live_weights_file"]))
    params = dict(lm.model.named_parameters())
    rng = np.random.default_rng(2)
    fused = copy.deepcopy(lm)
    fparams = dict(fused.model.named_parameters())
    tensors = {}
    for w, names in sec["branch_inputs"].items():
        out_f, in_f = params[w].shape
        A = rng.standard_normal((4, in_f)).astype(np.float32) * 0.3
        B = rng.standard_normal((out_f, 4)).astype(np.float32) * 0.3
        tensors[names["A"]], tensors[names["B"]] = A, B
        with torch.no_grad():
            fparams[w] += torch.from_numpy(B @ A)
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in tensors.items()})
    fmt.export_adapter(str(tmp_path / "a.onnx_adapter"))
    adapter = ort.LoraAdapter()
    adapter.Load(str(tmp_path / "a.onnx_adapter"))
    run_opts = ort.RunOptions()
    run_opts.add_active_adapter(adapter)
    sess = session(out / sec["file"])
    inputs = example_inputs(lm, batch=2, seq=6, seed=4)
    feeds = {**_np(inputs), **stored}
    got = sess.run(None, feeds, run_opts)[0]
    assert max_rel_error(got, _torch_ref(fused, inputs)) <= RTOL
    assert max_rel_error(sess.run(None, feeds)[0], _torch_ref(lm, inputs)) <= RTOL


def test_sira_variant_matches_torch_sira_layers(tmp_path):
    E, r, k, cf = 4, 2, 2, 1.0
    lm = load_model("tiny-minilm")
    targets = target_weight_names(lm.model, "qv")
    # No live weights here (every base weight constant), branches on q/v: the layout a peer
    # without in-place edits uses; the LoRA test covers live weights plus a branch.
    res = export_onnx(lm, tmp_path, [], ("sira", E, r, k, cf), branch_targets=targets,
                      check=False)
    sec = res["section"]
    assert sec["file"] == "model.sira-e4-r2-k2-c1.onnx" and res["weights"] == {}
    assert set(sec["branch_inputs"]) == set(targets)
    stored = load_file(str(tmp_path / sec["live_weights_file"]))
    rng = np.random.default_rng(3)
    ref_lm = copy.deepcopy(lm)
    feeds_branch = {}
    inputs = example_inputs(lm, batch=3, seq=8, seed=6)
    for w, names in sec["branch_inputs"].items():
        module = w[: -len(".weight")]
        linear = ref_lm.model.get_submodule(module)
        branch = SiraBranch(
            router=rng.standard_normal((E, linear.in_features)).astype(np.float32),
            A=rng.standard_normal((E, r, linear.in_features)).astype(np.float32) * 0.3,
            B=rng.standard_normal((E, linear.out_features, r)).astype(np.float32) * 0.3,
            top_k=k, capacity_factor=cf)
        feeds_branch.update({names["router"]: branch.router, names["A"]: branch.A,
                             names["B"]: branch.B})
        replace_module(ref_lm.model, module, insert_sira(linear, branch))
    layer = next(m for m in ref_lm.model.modules() if isinstance(m, SiraLinear))
    seen = {}
    hook = layer.register_forward_pre_hook(lambda _m, a: seen.setdefault("x", a[0]))
    ref = _torch_ref(ref_lm, inputs)
    hook.remove()
    x2d = seen["x"].reshape(-1, layer.in_features)
    with torch.no_grad():  # the capacity limit really drops assignments on this input
        probs = torch.softmax(x2d @ layer.sira_router.T, -1)
        assert not torch.equal(layer.gates(x2d), route(probs, k, x2d.shape[0]))
    got = session(tmp_path / sec["file"]).run(
        None, {**_np(inputs), **stored, **feeds_branch})[0]
    assert max_rel_error(got, ref) <= RTOL
    assert max_rel_error(ref, _torch_ref(lm, inputs)) > 1e-3  # the branch mattered


def test_unknown_live_weight_is_a_config_error(tmp_path):
    from edgeadapt.errors import ConfigError
    lm = load_model("tiny-smollm2")
    with pytest.raises(ConfigError, match="not a parameter"):
        export_onnx(lm, tmp_path, ["model.layers.0.self_attn.nope.weight"])
    with pytest.raises(ConfigError, match="invalid branch"):
        export_onnx(lm, tmp_path, target_weight_names(lm.model, "qv"), ("sira", 2, 2, 3, 1.0))
