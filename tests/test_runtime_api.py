"""``edgeadapt.runtime.load`` on bundles exported from tiny transformers: after every switch the
ONNX Runtime output equals the PyTorch model carrying the same adapters
(``edgeadapt.adapters.apply_adapter_torch``), the base comes back bit for bit, bad switches
leave the weights untouched, and the parity check catches stale prepacked weights."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cuda_standin import load_device_runtime  # noqa: E402
from runtime_reference import (  # noqa: E402
    example_pair,
    export_tiny,
    parity,
    random_adapters,
    register_adapters,
    requested,
    torch_reference,
)
from switching import device_hashes  # noqa: E402

from edgeadapt.errors import (  # noqa: E402
    ConfigError,
    FingerprintMismatchError,
    UnknownNameError,
)
from edgeadapt.format import (  # noqa: E402
    Adapter,
    AdapterEntry,
    read_adapter,
    read_manifest,
    write_adapter,
)
from edgeadapt.runtime import choose_mode, load  # noqa: E402
from edgeadapt.runtime.backends.onnxruntime import kernel as onnxruntime_kernel  # noqa: E402
from edgeadapt.runtime.policy import live_form  # noqa: E402

RTOL = 1e-4


def _adapters(lm, names: list[str], seed: int = 1) -> dict[str, Adapter]:
    """Hand-made SHiRA (5%), a second overlapping SHiRA and a rank-2 LoRA on the live weights."""
    a, b, lora = random_adapters(lm, names, names[: len(names) // 2 + 1], seed)
    return {"s1": a, "s2": b, "l1": lora}


@pytest.fixture(scope="module", params=["tiny-smollm2", "tiny-minilm"])
def exported(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    lm, manifest = export_tiny(request.param, out, num_labels=2)
    register_adapters(out, manifest, _adapters(lm, sorted(manifest.weights), seed=1))
    return lm, out


@pytest.mark.parametrize("mode", ["live", "live-matmul", "repack"])
def test_every_switch_matches_pytorch(exported, mode):
    """live: the blocked32 live weights read by edgeadapt's kernel where it builds;
    live-matmul: through MatMul (kernel=False)."""
    lm, bundle = exported
    t_in, np_in = example_pair(lm)
    rt = load(bundle, backend="onnxruntime", mode=mode.split("-")[0], threads=1,
              kernel=False if mode == "live-matmul" else None)
    kernel = mode == "live" and onnxruntime_kernel.unavailable() is None
    assert rt.live_form == ("own-kernel" if kernel else "blocked32")
    base = rt.run(**np_in)
    assert parity(base, torch_reference(lm, bundle, [], t_in)) <= RTOL
    for names, scales in [("s1", None), (["s1", "s2"], [1.0, 0.5]), ("l1", None),
                          (["l1", "s2"], [0.5, -1.0]), (None, None), (["s2"], [2.0])]:
        rt.switch(names, scales)
        expected = requested(bundle, names, scales)  # what was asked, not what rt reports
        assert rt.active_scales == expected
        want = torch_reference(lm, bundle, expected, t_in)
        got = rt.run(**np_in)
        assert parity(got, want) <= RTOL, (mode, names)
        if names is None:
            assert np.array_equal(got, base)
        else:
            # the adapter's effect is well above the backend-vs-PyTorch error
            assert parity(got, base) > 10 * parity(got, want)
    rt.switch(None)
    assert np.array_equal(rt.run(**np_in), base)


def test_parity_check_fails_on_stale_packed_weights(exported):
    """Prepacked weights edited without a rebuild keep the old output: the check must say so."""
    lm, bundle = exported
    t_in, np_in = example_pair(lm)
    rt = load(bundle, mode="repack", threads=1)
    # blocked32 live weights are turned back into 2-D (in, out) constants ORT can prepack
    blocked = {n for n, lw in rt.store.live_weights().items() if lw.layout == "blocked32"}
    assert blocked and set(rt.store._renamed) == {rt.store.graph_names[n] for n in blocked}
    rt.store.commit = lambda changes: None  # edit the host copy, skip the repack
    rt.switch("s1")
    assert parity(rt.run(**np_in), torch_reference(lm, bundle, [("s1", 1.0)], t_in)) > RTOL


def test_refused_switch_leaves_weights(exported, tmp_path):
    lm, bundle = exported
    rt = load(bundle, mode="live", threads=1)
    rt.switch("s1")

    def hashes():
        return {n: hashlib.sha256(lw.array.tobytes()).hexdigest()
                for n, lw in rt.store.live_weights().items()}

    before = hashes()
    with pytest.raises(UnknownNameError):
        rt.switch(["s1", "missing"])
    ad = read_adapter(bundle / "adapters" / "s2.eadp")
    other = replace(ad, weight_sha256={n: "0" * 64 for n in ad.weight_sha256})
    write_adapter(tmp_path / "other.eadp", other)
    rt.manifest.adapters["other"] = AdapterEntry(file=str(tmp_path / "other.eadp"),
                                                 method="shira")
    with pytest.raises(FingerprintMismatchError):
        rt.switch(["s1", "other"])
    with pytest.raises(ConfigError):
        rt.switch(["s1", "s2"], scales=[1.0])
    assert hashes() == before and rt.active == ("s1",)


def test_choose_mode_policy():
    assert choose_mode(None, None)[0] == "live"
    assert choose_mode(10, 64)[0] == "live"
    assert choose_mode(1e4, 1)[0] == "live"
    assert choose_mode(1e4, 64)[0] == "repack"
    # thresholds: 2x the measured break-evens (docs/bench.md), per backend and batch class
    assert choose_mode(68, 8)[0] == "repack" and choose_mode(67, 8)[0] == "live"
    assert choose_mode(1e9, 4)[0] == "live"  # ORT below batch 8: blocked32 costs nothing
    # ExecuTorch, own kernel (the default): live within the noise of packed at every shape
    assert choose_mode(21380, 1, "executorch")[0] == "repack"
    assert choose_mode(21379, 1, "executorch")[0] == "live"
    assert choose_mode(162, 8, "executorch", "own-kernel")[0] == "repack"
    assert choose_mode(161, 8, "executorch", "own-kernel")[0] == "live"
    # 2 x 345, the smaller break-even of run 3 (345 / 351); live 1.06-1.08x
    assert choose_mode(690, 1, "executorch", "weight-left")[0] == "repack"
    assert choose_mode(689, 1, "executorch", "weight-left")[0] == "live"
    assert choose_mode(1e9, 8, "executorch", "weight-left")[0] == "live"  # live <= packed
    mode, reason = choose_mode(100, 16)
    assert mode == "repack" and "100 runs per switch" in reason and "68" in reason
    assert "blocked32" in reason
    # bundles in older forms pay more per live forward, so repack earlier (run 4 / run 2)
    assert choose_mode(680, 1, "onnxruntime", "transposed")[0] == "repack"
    assert choose_mode(679, 1, "onnxruntime", "transposed")[0] == "live"
    assert choose_mode(110, 8, "onnxruntime", "transposed")[0] == "repack"
    assert choose_mode(582, 1, "executorch", "linear")[0] == "repack"
    assert choose_mode(581, 1, "executorch", "linear")[0] == "live"
    assert choose_mode(90, 8, "executorch", "linear")[0] == "repack"
    assert choose_mode(89, 8, "executorch", "linear")[0] == "live"
    assert choose_mode(1e9, 1, "onnxruntime", "own-kernel")[0] == "live"  # run 9: never
    assert choose_mode(72, 8, "onnxruntime", "own-kernel")[0] == "repack"
    assert choose_mode(71, 8, "onnxruntime", "own-kernel")[0] == "live"
    with pytest.raises(ConfigError, match="live form 'sideways'"):
        choose_mode(1, 1, "executorch", "sideways")


def test_auto_policy_keys_on_the_bundles_live_form(exported):
    """``load(mode="auto")`` picks thresholds for the form the bundle records: blocked32 on the
    tiny ONNX exports (q/v are MatMul-read with out % 32 == 0; MiniLM's task head stays as-is);
    an older transposed bundle or a linear-form ExecuTorch section reads as such."""
    _, bundle = exported
    manifest = read_manifest(bundle)
    assert "blocked32" in {w.onnxruntime["layout"] for w in manifest.weights.values()}
    assert live_form(manifest, "onnxruntime") == "blocked32"
    rt = load(bundle, backend="onnxruntime", mode="auto", runs_per_switch=1000, batch=1,
              threads=1, kernel=False)
    assert rt.fused_mode == "live" and "blocked32" in rt.mode_reason  # transposed: repack
    assert rt.live_form == "blocked32"
    assert load(bundle, backend="onnxruntime", mode="auto", runs_per_switch=70, batch=8,
                threads=1, kernel=False).fused_mode == "repack"  # blocked32: from 68
    if onnxruntime_kernel.unavailable() is None:  # by default the own kernel, where it builds
        rt = load(bundle, backend="onnxruntime", mode="auto", runs_per_switch=70, batch=8,
                  threads=1)
        assert rt.live_form == "own-kernel" and rt.store.kernel
        assert rt.fused_mode == "live" and "own-kernel" in rt.mode_reason  # from 72
    for w in manifest.weights.values():
        if w.onnxruntime["layout"] == "blocked32":
            w.onnxruntime = {**w.onnxruntime, "layout": "transposed"}
    assert live_form(manifest, "onnxruntime") == "transposed"
    manifest.executorch = {"file": "model.pte"}
    assert live_form(manifest, "executorch") == "linear"  # exported before weight-left
    manifest.executorch["live_form"] = "weight-left"
    assert live_form(manifest, "executorch") == "weight-left"


def test_load_rejects_bad_options(exported):
    _, bundle = exported
    with pytest.raises(UnknownNameError):
        load(bundle, backend="tflite")
    with pytest.raises(ConfigError):
        load(bundle, mode="sometimes")
    with pytest.raises(ConfigError):
        load(bundle, device="tpu")


@pytest.mark.parametrize("where", [
    pytest.param("cuda", marks=pytest.mark.gpu), "standin-torch", "standin-ortvalue"])
def test_device_store_switch_matches_pytorch(exported, where):
    """The CUDA store (device buffers bound by pointer, changes scattered into them) on the real
    architectures' blocked32 / transposed live weights: on a GPU where one is present, else its
    code on the CPU execution provider (tests/cuda_standin.py)."""
    lm, bundle = exported
    rt = load_device_runtime(bundle, where)
    t_in, np_in = example_pair(lm)
    base, hashes = rt.run(**np_in), device_hashes(rt)
    for names in ["s1", ["s1", "l1"], ["s2", "s1"], None]:
        rt.switch(names)
        expected = requested(bundle, names)  # what was asked, not what rt reports
        assert rt.active_scales == expected
        tol = 1e-3 if where == "cuda" else RTOL  # TF32 / reduction order on the GPU
        assert parity(rt.run(**np_in), torch_reference(lm, bundle, expected, t_in)) <= tol
    assert device_hashes(rt) == hashes
    assert np.array_equal(rt.run(**np_in), base)
