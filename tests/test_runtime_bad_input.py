"""Bad arguments to ``Runtime.switch`` / ``Runtime.run`` / ``load`` on ONNX Runtime: typed errors,
weights and outputs untouched (hashes of the live buffers, the last output bit for bit); the
accepted spellings (numpy scalars as scales, int32 ids, ``bundle.json`` as the path) give what
the PyTorch model with the same adapter gives."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from runtime_reference import (  # noqa: E402
    example_pair,
    export_tiny,
    parity,
    random_adapters,
    register_adapters,
    torch_reference,
)

from edgeadapt.errors import AdapterFormatError, BundleError, ConfigError  # noqa: E402
from edgeadapt.format import AdapterEntry  # noqa: E402
from edgeadapt.runtime import load  # noqa: E402

RTOL = 1e-4


@pytest.fixture(scope="module", params=["tiny-smollm2", "tiny-minilm"])
def exported(request, tmp_path_factory):
    """s1 (SHiRA), l1 (LoRA) and ``liar``: l1's file registered as a SHiRA adapter."""
    out = tmp_path_factory.mktemp(request.param)
    lm, manifest = export_tiny(request.param, out, num_labels=2)
    names = sorted(manifest.weights)
    s1, _, l1 = random_adapters(lm, names, names[:1], seed=1)
    manifest.adapters["liar"] = AdapterEntry(file="adapters/l1.eadp", method="shira")
    register_adapters(out, manifest, {"s1": s1, "l1": l1})
    return lm, out


def _hashes(rt):
    return {n: hashlib.sha256(lw.array.tobytes()).hexdigest()
            for n, lw in rt.store.live_weights().items()}


def test_numpy_scales_are_scales(exported):
    lm, bundle = exported
    t_in, np_in = example_pair(lm)
    rt = load(bundle, threads=1)
    want = torch_reference(lm, bundle, [("s1", 0.5)], t_in)
    for scale in (np.float32(0.5), np.float64(0.5), np.array(0.5), [np.float16(0.5)],
                  np.array([0.5])):
        rt.switch(None)
        rt.switch("s1", scale)
        assert rt.active_scales == (("s1", 0.5),), scale
        assert parity(rt.run(**np_in), want) <= RTOL, scale
    rt.switch(["s1", "l1"], (np.int64(1), np.float32(-0.5)))
    assert parity(rt.run(**np_in),
                  torch_reference(lm, bundle, [("s1", 1.0), ("l1", -0.5)], t_in)) <= RTOL


def test_bad_switch_arguments_are_refused_untouched(exported):
    lm, bundle = exported
    _, np_in = example_pair(lm)
    rt = load(bundle, threads=1)
    rt.switch("s1")
    out, h = rt.run(**np_in), _hashes(rt)
    for names, scales, err, text in [
            ("s1", "abc", ConfigError, "not a real number"),
            (["s1"], ["0.5"], ConfigError, "not a real number"),
            (["s1"], [None], ConfigError, "not a real number"),
            ("s1", True, ConfigError, "not a real number"),
            ("s1", np.array([[0.5]]), ConfigError, "not a real number"),
            ("s1", [0.5, 1.0], ConfigError, "1 names but 2 scales"),
            (["s1", "l1"], 0.5, ConfigError, "one scale per adapter"),
            ("s1", float("nan"), ConfigError, "not finite"),
            (3, None, ConfigError, "names must be"),
            ([["s1"]], None, ConfigError, "names must be"),
            ({"s1"}, None, ConfigError, "names must be"),
            (["s1", "s1"], None, ConfigError, "repeat"),
            ("liar", None, AdapterFormatError, "registers 'liar' as shira")]:
        with pytest.raises(err, match=text):
            rt.switch(names, scales)
        assert rt.active == ("s1",), (names, scales)
        assert _hashes(rt) == h and np.array_equal(rt.run(**np_in), out), (names, scales)


def test_bad_run_inputs_are_refused(exported):
    lm, bundle = exported
    t_in, np_in = example_pair(lm)
    rt = load(bundle, threads=1)
    base = rt.run(**np_in)
    ids = np_in["input_ids"]
    vocab = lm.vocab_size
    spec = {i["name"]: i for i in rt.manifest.inputs}
    assert spec["input_ids"]["range"] == [0, vocab]  # written at export
    bad = [({"input_ids": ids + 0.5}, "dtype float64"),
           ({"input_ids": ids.astype(bool)}, "dtype bool"),
           ({"input_ids": ids[0]}, "1-D|2-D"),
           ({"input_ids": ids[:, :0]}, "at least 1"),
           ({"input_ids": np.where(ids == ids[0, 0], -1, ids)}, "outside"),
           ({"input_ids": np.where(ids == ids[0, 0], vocab, ids)}, "outside"),
           ({"inputs_ids": ids}, "unknown"),
           ({}, "missing")]
    if "attention_mask" in spec:
        mask = np_in["attention_mask"]
        bad += [({"attention_mask": mask[:, 1:]}, "seq"),
                ({"attention_mask": mask * 2}, "outside")]
    for change, text in bad:
        feeds = {**np_in, **change} if change else {}
        with pytest.raises(ConfigError, match=text):
            rt.run(**feeds)
    # what does fit: int32 ids, a list of lists, the same logits as PyTorch
    for ids_ok in (ids.astype(np.int32), ids.tolist()):
        got = rt.run(**{**np_in, "input_ids": ids_ok})
        assert np.array_equal(got, base)
    assert parity(base, torch_reference(lm, bundle, [], t_in)) <= RTOL


def test_load_takes_the_manifest_path_and_refuses_bad_threads(exported):
    lm, bundle = exported
    t_in, np_in = example_pair(lm)
    rt = load(bundle / "bundle.json", threads=np.int64(1))
    assert rt.bundle_dir == bundle and rt.threads == 1
    rt.switch("l1")
    assert parity(rt.run(**np_in), torch_reference(lm, bundle, [("l1", 1.0)], t_in)) <= RTOL
    for threads in (-1, 0, 2.5, "2", True):
        with pytest.raises(ConfigError, match="threads"):
            load(bundle, threads=threads)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_graph_is_a_bundle_error(exported, tmp_path, damage):
    """ONNX Runtime's and onnx's own errors (InvalidProtobuf, DecodeError) come back typed, in
    every mode and with or without edgeadapt's kernel."""
    import shutil

    _, bundle = exported
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    graph = copy / "model.onnx"
    raw = graph.read_bytes()
    graph.write_bytes(raw[: len(raw) // 2] if damage == "truncated" else b"\x08\xff" * 999)
    for mode, kernel in (("live", None), ("live", False), ("repack", None)):
        with pytest.raises(BundleError, match="model.onnx"):
            load(copy, mode=mode, kernel=kernel, threads=1)
