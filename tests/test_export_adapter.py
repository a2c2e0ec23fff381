"""Export orchestration: bundle.json from a tiny base, adapters from training runs.

References: the base weights hashed here with hashlib; the run's own PyTorch model (adapter
layers attached) against a fresh base with the exported file applied by the adapters package's
PyTorch reference (``apply_adapter_torch``).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edgeadapt.adapters import (
    LoraConfig,
    ShiraConfig,
    SiraConfig,
    adapter_state,
    apply_adapter_torch,
    attach,
)
from edgeadapt.errors import (
    AdapterFormatError,
    ConfigError,
    ExportError,
    FingerprintMismatchError,
    TargetMismatchError,
    WriteError,
)
from edgeadapt.export import export_adapter
from edgeadapt.export.cli import export
from edgeadapt.format import read_adapter, read_manifest
from edgeadapt.models import example_inputs, forward, load_model, target_weight_names
from edgeadapt.train.run import base_weight_hashes, save_run

torch.set_num_threads(1)
MODEL = "tiny-smollm2"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A base bundle exported through the CLI (ONNX only, parity check left to the exporter's
    own tests to keep this file fast)."""
    out = tmp_path_factory.mktemp("bundle")
    res = CliRunner().invoke(export, ["base", "--model", MODEL, "--out", str(out), "--backends",
                                      "onnxruntime", "--no-check"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return out


def make_run(path, config, seed=0, model=MODEL):
    """A run directory as the trainer writes it, with random (non-zero) adapter values."""
    lm = load_model(model, seed=seed)
    names = attach(lm.model, config)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in lm.model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    weights = [n if n.endswith(".weight") else f"{n}.weight" for n in names]
    fresh = load_model(model, seed=seed)
    info = {"method": config.method, "config": config.to_dict(), "model": model, "task": "t",
            "targets": weights, "weight_sha256": base_weight_hashes(fresh, weights),
            "seed": seed}
    save_run(path, lm, info, adapter_state(lm.model), {})
    return lm


def test_base_manifest(bundle):
    m = read_manifest(bundle)
    base = load_model(MODEL)
    params = dict(base.model.named_parameters())
    expected = target_weight_names(base.model, "qv")
    assert sorted(m.weights) == sorted(expected) and m.targets_spec == "qv"
    for name, w in m.weights.items():
        arr = params[name].detach().numpy()
        assert w.sha256 == hashlib.sha256(np.ascontiguousarray(arr, np.float32).tobytes()
                                          ).hexdigest()
        assert w.shape == arr.shape
        assert w.onnxruntime["layout"] in ("as-is", "transposed", "blocked32")
    assert (bundle / m.onnxruntime["file"]).is_file() and m.kind == "causal-lm"


@pytest.mark.parametrize(("config", "dtype"), [
    (ShiraConfig(mask="random", density=0.05), "float32"),
    (LoraConfig(r=2), "float32"),
    (ShiraConfig(mask="random", density=0.05), "float16"),
])
def test_export_adapter_matches_the_run(bundle, tmp_path, config, dtype):
    run_model = make_run(tmp_path / "run", config)
    name = f"{config.method}-{dtype}"
    path = export_adapter(tmp_path / "run", bundle, name, dtype)
    m = read_manifest(bundle)
    assert m.adapters[name].file == f"adapters/{name}.eadp" and path == bundle / m.adapters[
        name].file
    assert m.adapters[name].method == config.method and m.adapters[name].variant is None
    adapter = read_adapter(path, m)
    base = load_model(MODEL)
    apply_adapter_torch(base.model, adapter)
    x = example_inputs(base, batch=2, seq=8, seed=3)
    with torch.no_grad():
        got, want = forward(base, x), forward(run_model, x)
    tol = 1e-5 if dtype == "float32" else 2e-3  # fp16 storage rounds the values
    assert torch.allclose(got, want, atol=tol, rtol=tol), (got - want).abs().max()
    if dtype != "float32":  # and the rounding did change something: the check can fail
        exact = read_adapter(export_adapter(tmp_path / "run", bundle, "exact", "float32"), m)
        assert not np.array_equal(
            next(iter(exact.targets.values())).values, next(iter(adapter.targets.values())).values)


def test_targets_outside_bundle(bundle, tmp_path):
    make_run(tmp_path / "run", LoraConfig(r=2, targets="attn"))
    with pytest.raises(TargetMismatchError, match=r"k_proj.*--targets 'attn'"):
        export_adapter(tmp_path / "run", bundle, "wide")
    assert "wide" not in read_manifest(bundle).adapters


def test_other_base_model(bundle, tmp_path):
    make_run(tmp_path / "run", ShiraConfig(density=0.05), seed=1)
    with pytest.raises(FingerprintMismatchError, match="different base model"):
        export_adapter(tmp_path / "run", bundle, "other")
    assert not (bundle / "adapters" / "other.eadp").exists()


def test_run_of_another_model_names_the_models(bundle, tmp_path):
    make_run(tmp_path / "run", ShiraConfig(density=0.05), model="tiny-minilm")
    with pytest.raises(FingerprintMismatchError, match="trained model 'tiny-minilm'.*"
                                                       "'tiny-smollm2'"):
        export_adapter(tmp_path / "run", bundle, "minilm")
    assert "minilm" not in read_manifest(bundle).adapters


def test_replacing_an_adapter_keeps_the_old_one_until_the_manifest_moves(bundle, tmp_path,
                                                                         monkeypatch):
    """Re-exporting a registered name writes a new file; a failure before bundle.json is
    written leaves the old file and entry as they were and no new file behind; a success
    points bundle.json at the new file and removes the old one."""
    import edgeadapt.export.adapter as ea

    make_run(tmp_path / "a", ShiraConfig(density=0.05), seed=0)
    make_run(tmp_path / "b", LoraConfig(r=2), seed=0)
    first = export_adapter(tmp_path / "a", bundle, "rep", "float32")
    old_bytes = first.read_bytes()
    files = sorted(p.name for p in (bundle / "adapters").iterdir())

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ea, "write_manifest", broken)
    with pytest.raises(OSError, match="disk full"):
        export_adapter(tmp_path / "b", bundle, "rep", "float32")
    monkeypatch.undo()
    m = read_manifest(bundle)
    assert m.adapters["rep"].method == "shira" and (bundle / m.adapters["rep"].file) == first
    assert first.read_bytes() == old_bytes
    assert sorted(p.name for p in (bundle / "adapters").iterdir()) == files

    second = export_adapter(tmp_path / "b", bundle, "rep", "float32")
    m = read_manifest(bundle)
    assert second != first and bundle / m.adapters["rep"].file == second
    assert not first.exists() and read_adapter(second, m).method == "lora"


def test_a_non_finite_adapter_exports_no_variant(bundle, tmp_path):
    """SiRA values that are NaN are refused before the SiRA graph variant is exported."""
    from safetensors.torch import load_file, save_file

    make_run(tmp_path / "run", SiraConfig(num_experts=2, r=2, top_k=1))
    st = tmp_path / "run" / "adapter.safetensors"
    tensors = load_file(str(st))
    key = next(iter(tensors))
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(st))
    before = sorted(p.name for p in bundle.iterdir())
    with pytest.raises(AdapterFormatError, match="finite"):
        export_adapter(tmp_path / "run", bundle, "nan")
    assert sorted(p.name for p in bundle.iterdir()) == before
    assert "nan" not in read_manifest(bundle).adapters


def test_export_base_refuses_an_unwritable_out_before_loading(tmp_path, monkeypatch):
    import edgeadapt.export.bundle as eb

    (tmp_path / "f").write_text("a file")
    monkeypatch.setattr(eb, "run_exporters", None)  # never reached
    with pytest.raises(WriteError, match="f/sub"):
        eb.export_base(MODEL, tmp_path / "f" / "sub")


def test_cli_adapter(bundle, tmp_path):
    make_run(tmp_path / "run", ShiraConfig(density=0.02))
    runner = CliRunner()
    res = runner.invoke(export, ["adapter", str(tmp_path / "run"), "--bundle", str(bundle),
                                 "--name", "cli", "--dtype", "bfloat16"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    data = json.loads((bundle / "bundle.json").read_text())
    assert data["adapters"]["cli"]["value_dtype"] == "bfloat16"
    bad = runner.invoke(export, ["adapter", str(tmp_path / "run"), "--bundle", str(bundle),
                                 "--name", "../evil"])
    assert isinstance(bad.exception, ConfigError)


@pytest.mark.slow
def test_sira_adapter_gets_a_graph_variant(bundle, tmp_path):
    make_run(tmp_path / "run", SiraConfig(num_experts=3, r=2, top_k=2))
    path = export_adapter(tmp_path / "run", bundle, "sira")
    m = read_manifest(bundle)
    key = m.adapters["sira"].variant
    assert key is not None and key.startswith("sira-e3-r2-k2")
    assert (bundle / m.variants[key]["onnxruntime"]["file"]).is_file()
    assert read_adapter(path, m).method == "sira"


@pytest.mark.slow
def test_sira_variant_with_a_shape_subset_grows_on_demand(tmp_path):
    """``pte_shapes``: SiRA's static-shape ExecuTorch variant is lowered for the asked shapes
    only; a later adapter asking for another shape re-lowers it with the union (ONNX graph
    kept), and the runtime switched to the adapter matches PyTorch with the adapter file
    applied at every recorded shape."""
    pytest.importorskip("executorch")
    from edgeadapt.export import export_base
    from edgeadapt.runtime import load

    out = export_base(MODEL, tmp_path / "bundle", backends=("onnxruntime", "executorch"),
                      check=False, pte_repack=False)
    make_run(tmp_path / "run", SiraConfig(num_experts=3, r=2, top_k=2))
    export_adapter(tmp_path / "run", out, "s1", check=False, pte_shapes=[(1, 8)])
    m = read_manifest(out)
    key = m.adapters["s1"].variant
    assert m.variants[key]["executorch"]["methods"]["static"] == {"1x8": "forward_1x8"}
    onnx_section = m.variants[key]["onnxruntime"]
    pte = out / m.variants[key]["executorch"]["file"]
    export_adapter(tmp_path / "run", out, "s2", check=True, pte_shapes=[(2, 8)])  # verified
    m = read_manifest(out)
    assert m.adapters["s2"].variant == key
    assert sorted(m.variants[key]["executorch"]["methods"]["static"]) == ["1x8", "2x8"]
    assert m.variants[key]["onnxruntime"] == onnx_section
    mtime = pte.stat().st_mtime_ns
    export_adapter(tmp_path / "run", out, "s3", check=False, pte_shapes=[(1, 8)])  # covered
    assert pte.stat().st_mtime_ns == mtime

    adapter = read_adapter(out / m.adapters["s2"].file, m)
    ref = load_model(MODEL)
    apply_adapter_torch(ref.model, adapter, adapter.scale)
    names = [i["name"] for i in m.inputs]
    rt = load(out, backend="executorch", mode="live", threads=1)
    rt.switch("s2")
    for shape in [(1, 8), (2, 8)]:
        x = {k: v for k, v in example_inputs(ref, batch=shape[0], seq=shape[1], seed=5).items()
             if k in names}
        with torch.no_grad():
            want = forward(ref, x).numpy()
            base = forward(load_model(MODEL), x).numpy()
        got = rt.run(**{k: v.numpy() for k, v in x.items()})
        assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max(), shape
        assert np.abs(base - want).max() > 1e-2 * np.abs(want).max()  # the adapter shows


def test_variant_shape_bookkeeping(bundle):
    """The shapes ensure_variant asks of a SiRA ExecuTorch program (default: 1x1, 1 x max_seq,
    max_batch x max_seq of the base program) and the shapes a recorded variant has."""
    from edgeadapt.export.adapter import _pte_static, _static_of

    m = read_manifest(bundle)  # ONNX only: the ExecuTorch maxima default to 8 x 64
    assert _pte_static(m, None) == [(1, 1), (1, 64), (8, 64)]
    m.executorch = {"max_batch": 4, "max_seq": 16}
    assert _pte_static(m, None) == [(1, 1), (1, 16), (4, 16)]
    assert _pte_static(m, [(2, 16)]) == [(2, 16)]
    variant = {"executorch": {"methods": {"forward": None, "static": {
        "1x64": "forward_1x64", "8x64": "forward_8x64"}}}}
    assert _static_of(variant) == {(1, 64), (8, 64)}
    assert _static_of({"onnx": {}}) is None


def test_bench_prepare_variants_only_adds_variants_and_keeps_the_base(tmp_path):
    """`python -m edgeadapt.bench.prepare`: a base with a LoRA variant, then --variants-only adds
    the SiRA variant to that bundle without re-exporting (the base files hash as before)."""
    from edgeadapt.bench.prepare import main as prepare

    out = tmp_path / "b"
    res = CliRunner().invoke(prepare, [MODEL, str(out), "--backends", "onnxruntime",
                                       "--lora-rank", "4", "--sira", "", "--no-check"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert list(read_manifest(out).variants) == ["lora-r4"]
    base = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.glob("model.onnx*")}
    res = CliRunner().invoke(prepare, [MODEL, str(out), "--variants-only", "--lora-rank", "4",
                                       "--sira", "2,2,1,1.0", "--pte-shapes", "1x8"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert sorted(read_manifest(out).variants) == ["lora-r4", "sira-e2-r2-k1-c1"]
    assert base == {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                    for p in out.glob("model.onnx*")}


def test_cli_passes_the_executorch_live_form(monkeypatch, tmp_path):
    """`export base --executorch-live-form` reaches export_base (the forms themselves are
    exported and checked against PyTorch in tests/test_export_executorch.py); a bad form is
    refused."""
    import edgeadapt.export.bundle as bundle_mod

    seen = {}
    monkeypatch.setattr(bundle_mod, "export_base",
                        lambda *a, **kw: seen.update(kw) or tmp_path)
    from edgeadapt.bench.prepare import main as prepare
    from edgeadapt.export.cli import PTE_LIVE_FORMS
    from edgeadapt.export.executorch_live_form import LIVE_FORMS

    assert set(PTE_LIVE_FORMS) == set(LIVE_FORMS)  # the torch-free twin the CLIs offer
    option = next(p for p in prepare.params if p.name == "pte_live_form")
    assert set(option.type.choices) == set(LIVE_FORMS)  # bench.prepare offers the same
    for form in LIVE_FORMS:  # the CLI offers every form the exporter has
        res = CliRunner().invoke(export, ["base", "--model", MODEL, "--out", str(tmp_path),
                                          "--backends", "executorch",
                                          "--executorch-live-form", form])
        assert res.exit_code == 0, res.output
        assert seen["pte_live_form"] == form
    res = CliRunner().invoke(export, ["base", "--model", MODEL, "--out", str(tmp_path),
                                      "--executorch-live-form", "diagonal"])
    assert res.exit_code != 0 and "diagonal" in res.output


def test_cli_base_refuses_too_few_labels(tmp_path):
    res = CliRunner().invoke(export, ["base", "--model", "tiny-minilm", "--out",
                                      str(tmp_path / "b"), "--num-labels", "0"])
    assert res.exit_code == 2 and "--num-labels" in res.output
    assert not (tmp_path / "b").exists()


def test_a_failed_base_export_leaves_the_old_bundle(tmp_path, monkeypatch):
    """The exporters write into a staging folder: one that fails midway (after writing a new
    model.onnx there) leaves every file of the bundle already in place byte for byte."""
    import edgeadapt.export.bundle as eb

    out = tmp_path / "b"
    eb.export_base(MODEL, out, backends="onnxruntime", targets="qv", check=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = eb.run_exporters

    def dies_midway(lm, staging, *args, **kwargs):
        real(lm, staging, *args, **kwargs)  # new files written ...
        assert (staging / "model.onnx").is_file() and staging.parent == out
        raise ExportError("parity check failed")  # ... then the check fails

    monkeypatch.setattr(eb, "run_exporters", dies_midway)
    with pytest.raises(ExportError, match="parity"):
        eb.export_base(MODEL, out, backends="onnxruntime", targets="attn", check=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.undo()
    eb.export_base(MODEL, out, backends="onnxruntime", targets="attn", check=False)
    assert read_manifest(out).targets_spec == "attn"
    assert not [p for p in out.iterdir() if p.name.startswith(".export-")]


def test_export_base_removes_staging_left_by_a_killed_export(tmp_path):
    """A killed export leaves its ``.export-<host>-<pid>-*`` folder (its ``finally`` never ran);
    the next export of the bundle removes it, and leaves alone the folders of a process still
    running (another export at work), of another host and of any other name."""
    import edgeadapt.export.bundle as eb

    out = tmp_path / "b"
    out.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(gone.stdout)  # exited and reaped: no such process now
    dead = out / f"{eb._staging_prefix(dead_pid)}x1"
    running = out / f"{eb._staging_prefix(os.getpid())}x2"
    other_host = out / f".export-{'z' * 70}-{dead_pid}-x3"
    other_name = out / ".export-notapid-x4"
    for d in (dead, running, other_host, other_name):
        d.mkdir()
        (d / "model.onnx").write_bytes(b"half-written")
    eb.export_base(MODEL, out, backends="onnxruntime", targets="qv", check=False)
    assert not dead.exists()
    assert all((d / "model.onnx").read_bytes() == b"half-written"
               for d in (running, other_host, other_name))
    assert read_manifest(out).targets_spec == "qv"
