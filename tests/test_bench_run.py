"""`edgeadapt bench` end to end on a tiny bundle: every variant checked against PyTorch before it
is timed, the JSON contract, skipped backends, the plot; and the refusal to time a variant whose
output is wrong."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edgeadapt.bench.schema import METHODS, VARIANTS, validate_report
from edgeadapt.errors import ParityError


@pytest.fixture(scope="module")
def base_bundle(tmp_path_factory):
    """A tiny ONNX bundle without graph variants (fused variants only)."""
    torch.set_num_threads(1)
    from edgeadapt.export.bundle import export_base

    out = tmp_path_factory.mktemp("base-bundle")
    export_base("tiny-smollm2", out, backends=("onnxruntime",), targets="qv", check=False)
    return out


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    """A tiny ONNX bundle with LoRA and SiRA branch variants (every forward variant)."""
    torch.set_num_threads(1)
    from edgeadapt.export.adapter import ensure_variant
    from edgeadapt.export.bundle import export_base
    from edgeadapt.format.manifest import read_manifest, write_manifest

    out = tmp_path_factory.mktemp("bundle")
    export_base("tiny-smollm2", out, backends=("onnxruntime",), targets="qv", check=False)
    m = read_manifest(out)
    # the benchmark checks every variant against PyTorch itself before timing it
    ensure_variant(out, m, ("lora", 8), check=False)
    ensure_variant(out, m, ("sira", 3, 2, 2, 1.25), check=False)
    write_manifest(out, m)
    return out


def test_cli_fused_variants_and_skips(base_bundle, tmp_path):
    from edgeadapt.bench.cli import bench

    js = tmp_path / "out.json"
    res = CliRunner().invoke(bench, [
        str(base_bundle), "--backends", "onnxruntime", "--shapes", "1x4", "--repeats", "2",
        "--switch-repeats", "3", "--reload-repeats", "1", "--warmup", "1", "--no-peers",
        "--json", str(js)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    rep = json.loads(js.read_text())
    validate_report(rep)
    assert {r["variant"] for r in rep["forward"]} == {"base", "shira-live", "shira-repack",
                                                      "lora-fused"}
    skipped = {s["what"] for s in rep["skipped"]}
    assert {"lora-unfused", "sira-unfused", "ort-lora-adapter"} <= skipped
    assert rep["command"].startswith("edgeadapt bench")
    assert rep["threads"] == 1 and rep["threads_by_backend"] == {"onnxruntime:cpu": 1}
    from edgeadapt.runtime.backends.onnxruntime import kernel as onnxruntime_kernel

    assert rep["live_form_by_backend"] == {  # the blocked32 bundle, by edgeadapt's kernel?
        "onnxruntime:cpu": "own-kernel" if onnxruntime_kernel.unavailable() is None
        else "blocked32"}
    mem = next(r for r in rep["memory"] if r["runtime"] == "live after switches")
    assert mem["collapsed_bytes"] is None  # ExecuTorch's planned buffers only
    # each switch series was checked against PyTorch for both adapters of its cycle, and the
    # switch back to the base is bit-identical to the runtime's output before any switch
    checks = {}
    for r in rep["parity"]:
        if r["check"] in ("switch", "restore"):
            checks.setdefault((r["method"], r["mode"]), []).append(
                (r["check"], r["adapter"], r["bit_exact"] if r["check"] == "restore" else None))
    shira, lora = sorted(n for n in rep["adapters"] if n.startswith("bench-shira")), \
        sorted(n for n in rep["adapters"] if n.startswith("bench-lora-") and "unfused" not in n)
    for key, names in ((("shira", "live"), shira), (("shira", "repack"), shira),
                       (("lora-fuse", "live"), lora)):
        assert checks[key] == [("switch", names[0], None), ("switch", names[1], None),
                               ("restore", None, True)]
    assert all(r["seq"] == 4 and r["batch"] == 1 for r in rep["parity"])
    reload = next(r for r in rep["parity"] if r["check"] == "reload")
    assert reload["mode"] == "repack" and reload["max_rel_error"] <= 1e-3
    # switch ratios are against the SHiRA switch of the same rounds, row by row
    rows = {(r["method"], r["mode"]): r for r in rep["switch"]}
    assert rows[("shira", "live")]["ratio_vs_shira"] == 1.0
    assert all(r["ratio_vs_shira"] > 0 for r in rows.values())
    assert "shira_same_rounds_p50_ms" in rows[("reload", "repack")]
    base = next(r for r in rep["forward"] if r["variant"] == "base")
    assert base["runtime_mode"] == "repack" and "gpu" not in rep
    # the floor's bandwidth was timed in the switch rounds, one copy per timed switch
    fl = rep["floor"]["per_backend"]["onnxruntime:cpu"]
    assert fl["measured_over_floor"] == rep["floor"]["measured_over_floor"]["onnxruntime:cpu"]
    assert 0 < fl["floor_ms_peak"] <= fl["floor_ms"] and fl["bandwidth_GBps"] > 0
    # its traffic counts the cache lines of the layout the live buffers have (blocked32 here:
    # X[b, c, j] = W[32b + j, c]), by hand from the same two SHiRA adapters
    from edgeadapt.bench.adapters import collect
    from edgeadapt.format.manifest import read_manifest

    m = read_manifest(base_bundle)
    aset = collect(base_bundle, m, tmp_path / "scratch")
    a, b = (aset.adapters[n] for n in aset.of("shira")[:2])
    lines = 0
    for n in sorted(set(a.targets) | set(b.targets)):
        assert m.weights[n].onnxruntime["layout"] == "blocked32"
        fan_in = m.weights[n].shape[1]
        i = np.union1d(a.targets[n].indices, b.targets[n].indices)
        r, c = i // fan_in, i % fan_in
        lines += np.unique(((r // 32) * fan_in * 32 + c * 32 + r % 32) // 16).size
    assert fl["cache_lines"] == lines == rep["floor"]["cache_lines"]
    assert fl["layouts"] == ["blocked32"] and rep["floor"]["layout"] == "onnxruntime:cpu"


def test_cli_several_sessions_per_variant(base_bundle, tmp_path):
    """--sessions 2: every variant runs as two sessions, each checked against PyTorch, pooled
    into one row per variant (2 x repeats samples)."""
    from edgeadapt.bench.cli import bench

    js = tmp_path / "out.json"
    res = CliRunner().invoke(bench, [
        str(base_bundle), "--backends", "onnxruntime", "--shapes", "1x4", "--repeats", "3",
        "--switch-repeats", "2", "--reload-repeats", "1", "--warmup", "1", "--no-peers",
        "--sessions", "2", "--json", str(js)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    rep = json.loads(js.read_text())
    validate_report(rep)
    rows = rep["forward"]
    assert sorted(r["variant"] for r in rows) == sorted({r["variant"] for r in rows})
    assert all(r["n"] == 6 and r["sessions"] == 2 for r in rows)
    checked = sorted((r["variant"], r["instance"]) for r in rep["parity"]
                     if r["check"] == "forward")
    assert checked == sorted((r["variant"], i) for r in rows for i in (0, 1))
    assert next(r for r in rows if r["variant"] == "base")["ratio_vs_base"] == 1.0


def test_cli_rejects_bad_shapes(base_bundle):
    from edgeadapt.bench.cli import bench

    res = CliRunner().invoke(bench, [str(base_bundle), "--shapes", "1by4"])
    assert res.exit_code == 2 and "--shapes" in res.output


@pytest.mark.slow
def test_cli_end_to_end(tiny_bundle, tmp_path):
    from edgeadapt.bench.cli import bench

    js, png = tmp_path / "out.json", tmp_path / "out.png"
    res = CliRunner().invoke(bench, [
        str(tiny_bundle), "--backends", "onnxruntime,onnxruntime:cuda", "--shapes",
        "1x1,2x8", "--repeats", "3", "--switch-repeats", "4", "--reload-repeats", "2",
        "--warmup", "1", "--json", str(js), "--plot", str(png)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    rep = json.loads(js.read_text())
    validate_report(rep)
    assert rep["model"] == "tiny-smollm2"
    cpu = {(r["variant"], r["batch"], r["seq"]) for r in rep["forward"]
           if (r["backend"], r["device"]) == ("onnxruntime", "cpu")}
    assert cpu == {(v, b, s) for v in VARIANTS for b, s in ((1, 1), (2, 8))}
    # every timed variant was first checked against PyTorch at every shape
    checked = {(r["variant"], r["batch"], r["seq"]) for r in rep["parity"]
               if r["check"] == "forward" and r["device"] == "cpu"}
    assert checked == {(v, b, s) for v in VARIANTS for b, s in ((1, 1), (2, 8))}
    assert all(r["max_rel_error"] <= 1e-3 for r in rep["parity"])
    # every switch method was checked after its series: both adapters, then the base
    switched = {(r["backend"], r["method"], r["mode"], r["check"]) for r in rep["parity"]
                if r["check"] != "forward" and r["device"] == "cpu"}
    assert {("onnxruntime", "ort-adapter", "unfused", "switch"),
            ("onnxruntime", "ort-adapter", "unfused", "restore"),
            ("pytorch", "peft-shira-merge", "merge", "merge"),
            ("pytorch", "peft-shira-merge", "merge", "unmerge"),
            ("pytorch", "peft-lora-merge", "merge", "merge"),
            ("pytorch", "peft-lora-merge", "merge", "unmerge")} <= switched
    methods = {(r["backend"], r["method"], r["mode"]) for r in rep["switch"]
               if r["device"] == "cpu"}
    assert {("onnxruntime", "shira", "live"), ("onnxruntime", "shira", "repack"),
            ("onnxruntime", "lora-fuse", "live"), ("onnxruntime", "reload", "repack"),
            ("onnxruntime", "ort-adapter", "unfused"), ("pytorch", "peft-shira-merge",
            "merge"), ("pytorch", "peft-lora-merge", "merge")} <= methods
    assert {m for _, m, _ in methods} <= set(METHODS)
    base = [r for r in rep["forward"] if r["variant"] == "base"]
    assert all(r["ratio_vs_base"] == 1.0 for r in base)
    assert rep["floor"]["shira_switch_ms"] > 0 and rep["floor"]["bandwidth_GBps"] > 0
    # a LoRA switch keeps whole matrices for exact restore, SHiRA only its positions
    mem = next(r for r in rep["memory"] if r["runtime"] == "live after switches")
    assert 0 < mem["restore_bytes_shira"] < mem["restore_bytes_lora"]
    if "CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers() or \
            not torch.cuda.is_available():
        assert any((s["backend"], s["device"]) == ("onnxruntime", "cuda")
                   for s in rep["skipped"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "targets:" in res.output


def test_refuses_to_time_a_wrong_fused_variant(base_bundle, monkeypatch):
    """A deliberately wrong weight in the live runtime (as a stale packed buffer would give):
    the parity check before timing raises ParityError and nothing is timed."""
    from edgeadapt.bench.options import BenchOptions
    from edgeadapt.bench.run import run_bench
    from edgeadapt.runtime.api import Runtime

    original = Runtime.switch

    def broken_switch(self, names, scales=None):
        original(self, names, scales)
        if self.mode == "live" and names:
            lw = next(iter(self.store.live_weights().values()))
            lw.array.reshape(-1)[:: 7] += np.float32(0.5)  # the wrong weight

    monkeypatch.setattr(Runtime, "switch", broken_switch)
    timed = []
    with pytest.raises(ParityError, match="shira-live"):
        run_bench(base_bundle, BenchOptions(backends=["onnxruntime"], shapes=[(1, 4)],
                                            repeats=2, peers=False),
                  progress=timed.append)
    assert timed == []


_QUICK = dict(backends=["onnxruntime"], shapes=[(1, 4)], repeats=1, warmup=0,
              switch_repeats=2, reload_repeats=1, peers=False)


def test_refuses_to_report_switches_that_do_not_switch(base_bundle, monkeypatch):
    """Every live runtime's later switches made no-ops (the forward check after the first one
    still passes): the check after the switch series raises ParityError."""
    from edgeadapt.bench.options import BenchOptions
    from edgeadapt.bench.run import run_bench
    from edgeadapt.runtime.api import Runtime

    original = Runtime.switch

    def first_only(self, names, scales=None):
        if self.mode == "live" and getattr(self, "_switched", False):
            return
        self._switched = True
        original(self, names, scales)

    monkeypatch.setattr(Runtime, "switch", first_only)
    with pytest.raises(ParityError, match=r"shira switch \(live\) to bench-shira-1"):
        run_bench(base_bundle, BenchOptions(**_QUICK))


def test_refuses_to_report_repack_switches_without_rebuild(base_bundle, monkeypatch):
    """The repack store's commit rebuilds only the first time (a stale packed session)."""
    from edgeadapt.bench.options import BenchOptions
    from edgeadapt.bench.run import run_bench
    from edgeadapt.runtime.backends.onnxruntime.store import OrtRepackStore

    original = OrtRepackStore.commit

    def once(self, changes):
        if self.rebuilds == 0:
            original(self, changes)

    monkeypatch.setattr(OrtRepackStore, "commit", once)
    with pytest.raises(ParityError, match=r"shira switch \(repack\) to bench-shira-1"):
        run_bench(base_bundle, BenchOptions(**_QUICK))


def test_refuses_a_restore_that_is_not_bit_exact(base_bundle, monkeypatch):
    """Back to the base, one live weight is off by 1e-4 of its largest value: within the
    parity tolerance, but not the exact restore a live switch promises."""
    from edgeadapt.bench.options import BenchOptions
    from edgeadapt.bench.run import run_bench
    from edgeadapt.runtime.api import Runtime

    original = Runtime.switch

    def inexact(self, names, scales=None):
        original(self, names, scales)
        if self.mode == "live" and not names:
            a = next(iter(self.store.live_weights().values())).array.reshape(-1)
            a[0] += np.float32(1e-4) * np.abs(a).max()

    monkeypatch.setattr(Runtime, "switch", inexact)
    with pytest.raises(ParityError, match="not bit-exact"):
        run_bench(base_bundle, BenchOptions(**_QUICK))


def test_refuses_peft_peer_that_does_not_unmerge(base_bundle, monkeypatch):
    """A PEFT switch that merges the next adapter without unmerging the previous one: the
    merged weights differ from W0 + delta computed with apply_adapter_torch."""
    pytest.importorskip("peft")
    from edgeadapt.bench import peers
    from edgeadapt.bench.options import BenchOptions
    from edgeadapt.bench.run import run_bench

    def no_unmerge(self, name):
        if name is not None:
            self.pm.base_model.merge_adapter([name])
        self.merged = name

    monkeypatch.setattr(peers.PeftSwitch, "to", no_unmerge)
    with pytest.raises(ParityError, match="peft-shira-merge merge of bench-shira-"):
        run_bench(base_bundle, BenchOptions(**{**_QUICK, "peers": True}))


def test_forward_cases_time_the_store_not_runtime_run(base_bundle, monkeypatch):
    """Every case times the model's forward alone (rt.store.run on inputs checked once),
    as the unfused sessions do: Runtime.run (input check, locks) is never called."""
    from edgeadapt.bench.options import BenchOptions
    from edgeadapt.bench.run import run_bench
    from edgeadapt.runtime.api import Runtime

    def refuse(self, **inputs):
        raise AssertionError("Runtime.run timed")

    monkeypatch.setattr(Runtime, "run", refuse)
    rep = run_bench(base_bundle, BenchOptions(**_QUICK))
    assert {r["variant"] for r in rep["forward"]} == {"base", "shira-live", "shira-repack",
                                                      "lora-fused"}


def _copy(bundle, tmp_path):
    import shutil

    out = tmp_path / "bundle"
    shutil.copytree(bundle, out)
    return out


def test_bundle_errors_raise_typed(base_bundle, tmp_path):
    """A missing or corrupt base model is a BundleError naming the file, not a skipped
    backend; only an unavailable backend (no .pte section here) is skipped."""
    from edgeadapt.bench.options import BenchOptions
    from edgeadapt.bench.run import run_bench
    from edgeadapt.errors import BundleError, ConfigError

    bundle = _copy(base_bundle, tmp_path)
    (bundle / "model.onnx").write_bytes(b"\x0a\xff\xff not a protobuf")
    with pytest.raises(BundleError, match="model.onnx"):
        run_bench(bundle, BenchOptions(**_QUICK))
    (bundle / "model.onnx").unlink()
    with pytest.raises(BundleError, match="model.onnx"):
        run_bench(bundle, BenchOptions(**_QUICK))
    with pytest.raises(ConfigError, match="no backends"):
        run_bench(base_bundle, BenchOptions(**{**_QUICK, "backends": []}))
    rep = run_bench(base_bundle, BenchOptions(**{**_QUICK, "backends": ["executorch"]}))
    assert rep["forward"] == [] and rep["skipped"] == [
        {"backend": "executorch", "device": "cpu", "what": "all",
         "reason": "the bundle has no executorch section (export with --backends executorch)"}]


def test_a_broken_variant_is_skipped_alone(tiny_bundle, tmp_path):
    """The LoRA variant graph deleted: its three cases are skipped with the reason, the base,
    fused and SiRA cases are still measured."""
    from edgeadapt.bench.options import BenchOptions
    from edgeadapt.bench.run import run_bench

    bundle = _copy(tiny_bundle, tmp_path)
    (bundle / "model.lora-r8.onnx").unlink()
    rep = run_bench(bundle, BenchOptions(**_QUICK))
    assert {r["variant"] for r in rep["forward"]} == {"base", "shira-live", "shira-repack",
                                                      "lora-fused", "sira-unfused"}
    reasons = {s["what"]: s["reason"] for s in rep["skipped"]}
    for what in ("lora-unfused", "sora-unfused", "ort-lora-adapter"):
        assert "model.lora-r8.onnx" in reasons[what]
    assert not any(s["what"] == "all" for s in rep["skipped"])


@pytest.mark.parametrize("args, option", [
    (["--threads", "0"], "--threads"), (["--repeats", "0"], "--repeats"),
    (["--switch-repeats", "0"], "--switch-repeats"), (["--warmup", "-1"], "--warmup"),
    (["--reload-repeats", "0"], "--reload-repeats"), (["--backends", ""], "--backends"),
    (["--backends", " , "], "--backends")])
def test_cli_rejects_bad_counts_before_loading(base_bundle, args, option, monkeypatch):
    from edgeadapt.bench import run
    from edgeadapt.bench.cli import bench

    def never(*a, **k):
        raise AssertionError("loaded")

    monkeypatch.setattr(run, "run_bench", never)
    res = CliRunner().invoke(bench, [str(base_bundle), *args])
    assert res.exit_code == 2 and option in res.output, res.output


def test_cli_names_the_new_spelling_of_an_old_backend_name(base_bundle, monkeypatch):
    from edgeadapt.bench import run
    from edgeadapt.bench.cli import bench

    monkeypatch.setattr(run, "run_bench", lambda *a, **k: pytest.fail("loaded"))
    res = CliRunner().invoke(bench, [str(base_bundle), "--backends", "onnxruntime-cpu"])
    assert res.exit_code == 2 and "'onnxruntime-cpu' is now spelt 'onnxruntime'" in res.output
    res = CliRunner().invoke(bench, [str(base_bundle), "--backends", "onnxruntime-cuda"])
    assert res.exit_code == 2 and "now spelt 'onnxruntime:cuda'" in res.output
