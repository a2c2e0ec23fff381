"""``edgeadapt bench BUNDLE --generate`` on the tiny generate bundle (tiny SmolLM2 from a saved
Hugging Face directory, q/v live, SHiRA adapters s1 and s2): the rows of every case and peer
with sane fields, the targets and the plot; every case checked against transformers before it
is timed (an edited bundle is refused); skipped backends, cases and peers with their reasons;
the schema's refusals. onnxruntime-genai is an optional peer: where it is installed, its models
are built from the tiny directory and its rows checked too."""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil

import numpy as np
import pytest

pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402
from generate_bundle import export_tiny_generate  # noqa: E402

from edgeadapt.bench.generation.options import GenerateOptions  # noqa: E402
from edgeadapt.bench.generation.run import run_generate  # noqa: E402
from edgeadapt.bench.options import BenchOptions  # noqa: E402
from edgeadapt.bench.schema import check_targets, validate_report  # noqa: E402
from edgeadapt.bench.synth import equal_rank  # noqa: E402
from edgeadapt.cli import main  # noqa: E402
from edgeadapt.errors import ConfigError, ParityError  # noqa: E402
from edgeadapt.format import read_manifest  # noqa: E402

HAS_GENAI = importlib.util.find_spec("onnxruntime_genai") is not None
SIZES = ["--prompt-tokens", "8,16", "--contexts", "16,32", "--decode-steps", "3",
         "--ttft-repeats", "2", "--requests", "3", "--reply-tokens", "4", "--load-switches",
         "5", "--load-interval-ms", "1", "--parity-tokens", "8", "--warmup", "1",
         "--threads", "1"]
QUICK = GenerateOptions(prompt_tokens=[8], contexts=[16], decode_steps=2, ttft_repeats=1,
                        requests=2, reply_tokens=3, load_switches=2, load_interval_ms=1.0,
                        parity_tokens=8)
OURS = {"base", "shira-fused", "lora-fused"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return export_tiny_generate(tmp_path_factory.mktemp("bench-generate"))


@pytest.fixture(scope="module")
def report(tiny, tmp_path_factory):
    """One CLI run with every peer (genai where installed), executorch asked for too."""
    _, bundle = tiny
    out = tmp_path_factory.mktemp("bench-generate-out")
    res = CliRunner().invoke(main, [
        "bench", str(bundle), "--generate", "--backends", "onnxruntime,executorch", *SIZES,
        "--genai-dir", str(out / "genai"), "--json", str(out / "gen.json"),
        "--plot", str(out / "gen.png")])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return json.loads((out / "gen.json").read_text()), res.output, out


def _cases(rows, backend, size_key, size):
    return {r["case"] for r in rows if r["backend"] == backend and r[size_key] == size}


def test_rows_exist_with_sane_fields(report, tiny):
    rep, text, out = report
    validate_report(rep)
    gen = rep["generate"]
    assert "forward" not in rep and rep["command"].startswith("edgeadapt bench")
    for size in (8, 16):
        assert _cases(gen["first_token"], "onnxruntime", "prompt_tokens", size) == OURS
        assert _cases(gen["first_token"], "pytorch", "prompt_tokens", size) == {"base",
                                                                               "peft-lora"}
    for size in (16, 32):
        assert _cases(gen["decode"], "onnxruntime", "context", size) == OURS
    for r in gen["first_token"]:
        assert r["n"] == 2 and 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
        assert r["prefill_tok_s"] == pytest.approx(r["prompt_tokens"] * 1000 / r["p50_ms"])
    for r in gen["decode"]:
        assert r["n"] == 3 and r["tok_s"] == pytest.approx(1000 / r["p50_ms"])
        assert (r["case"] == "base") == ("ratio_vs_base" not in r)  # paired with its own base
    (switch,) = gen["switch"]
    assert switch["adapters"] == ["s1", "s2"] and switch["n"] == 3
    assert switch["ratio_vs_answer"] > 0 and switch["answer_tokens"] == 4
    (load,) = gen["load"]
    assert load["n"] == 5 and load["decoding_threads"] == 2 and load["decode_n"] > 0
    # the lock's split of each switch: waiting for the runs, then holding them off
    assert 0 <= load["wait_p50_ms"] <= load["wait_p99_ms"] <= load["p99_ms"]
    assert 0 < load["held_p50_ms"] <= load["held_p99_ms"] <= load["p99_ms"]
    # parity first: every case's greedy tokens, both restores bit-exact, the switch checks
    checked = {(r["backend"], r["case"]) for r in gen["parity"] if r["check"] == "greedy-tokens"}
    assert {("onnxruntime", c) for c in OURS} | {("pytorch", "peft-lora")} <= checked
    restores = [r for r in gen["parity"] if r["check"] in ("restore-weights", "restore")]
    assert len(restores) == 3 and all(r["bit_exact"] for r in restores)
    # the LoRA holds as many values as the SHiRA adapter has positions (nearest rank)
    shapes = {n: tuple(w.shape) for n, w in read_manifest(tiny[1]).weights.items()}
    rank = equal_rank(shapes, rep["adapters"]["s1"]["params"])
    lora = rep["adapters"][gen["lora_adapter"]]
    assert lora["params"] == rank * sum(o + i for o, i in shapes.values()) and lora["synthetic"]
    targets = {t["target"].split(" @")[0] for t in check_targets(rep)}
    assert {"shira-fused/base decode", "switch/answer between requests",
            "switch p99 under load (ms)"} <= targets
    assert "targets:" in text and "switch under load onnxruntime:cpu" in text
    assert (out / "gen.png").read_bytes()[:4] == b"\x89PNG"


def test_skipped_backends_cases_and_peers(report):
    rep = report[0]
    skipped = {(s["backend"], s["what"]): s["reason"] for s in rep["skipped"]}
    assert "no executorch section" in skipped[("executorch", "generate")]
    for case in ("lora-unfused", "sira-unfused"):
        assert "graph variant" in skipped[("onnxruntime", f"generate {case}")]
    if not HAS_GENAI:
        assert "pip install --no-deps onnxruntime-genai" in skipped[("onnxruntime-genai",
                                                                     "peer")]


@pytest.mark.skipif(not HAS_GENAI, reason="onnxruntime-genai is not installed (optional peer)")
def test_genai_peer_built_checked_and_timed(report):
    import onnx

    rep, text, out = report
    gen = rep["generate"]
    for size in (16, 32):
        assert _cases(gen["decode"], "onnxruntime-genai", "context", size) == {
            "base", "lora-adapter"}
    checks = {(r["case"], r["check"]) for r in gen["parity"]
              if r["backend"] == "onnxruntime-genai"}
    assert checks == {("base", "greedy-tokens"), ("lora-adapter", "greedy-tokens"),
                      ("lora-adapter", "prompt-logits")}
    ratios = {(r["num_case"], r["den_case"]) for r in gen["ratios"]
              if r["num_backend"] == "onnxruntime-genai"}
    assert ratios == {("base", "base"), ("lora-adapter", "shira-fused")}
    peer = gen["peers"]["onnxruntime-genai"]
    assert peer["lora_params"] == rep["adapters"][gen["lora_adapter"]]["params"]
    # the adapter's tensors are required inputs of genai's LoRA graph: no run without them
    model = onnx.load(str(out / "genai" / "lora" / "model.onnx"), load_external_data=False)
    lora_inputs = {i.name for i in model.graph.input if ".lora_" in i.name}
    assert lora_inputs and not lora_inputs & {t.name for t in model.graph.initializer}
    config = json.loads((out / "genai" / "base" / "genai_config.json").read_text())
    options = config["model"]["decoder"]["session_options"]
    assert options["intra_op_num_threads"] == 1
    assert options["session.intra_op.allow_spinning"] == "0"
    assert "genai lora/shira-fused decode @16" in text


def test_parity_refuses_an_edited_bundle(tiny):
    """The decoder's largest constant weight (not a live one) negated in its data file: the
    greedy tokens differ from transformers' and nothing is timed."""
    import onnx

    _, bundle = tiny
    edited = bundle.parent / "edited"  # beside the bundle: its "../hf" still resolves
    shutil.copytree(bundle, edited)
    section = read_manifest(edited).onnxruntime["decoder"]
    model = onnx.load(str(edited / section["file"]), load_external_data=False)
    where = max((dict((e.key, e.value) for e in t.external_data) for t in model.graph.initializer
                 if t.external_data), key=lambda e: int(e["length"]))
    path, offset, length = edited / where["location"], int(where["offset"]), int(where["length"])
    data = bytearray(path.read_bytes())
    values = np.frombuffer(bytes(data[offset:offset + length]), dtype=np.float32)
    data[offset:offset + length] = (-3.0 * values).astype(np.float32).tobytes()
    path.write_bytes(bytes(data))
    opts = BenchOptions(backends=["onnxruntime"], threads=1, warmup=0, peers=False)
    with pytest.raises(ParityError, match="greedy tokens"):
        run_generate(edited, opts, QUICK)


@pytest.mark.slow  # exports a LoRA graph variant and its decoder (~15 s)
def test_unfused_case_runs_through_the_variant_decoder(tiny):
    """A bundle with a LoRA graph variant: the unfused LoRA generates through the variant's
    decoder, parity-checked against transformers like every case, and gets its rows; SiRA,
    without a variant, is skipped with the reason."""
    from edgeadapt.export.adapter import ensure_variant
    from edgeadapt.format.manifest import write_manifest

    _, bundle = tiny
    variant = bundle.parent / "variant"
    shutil.copytree(bundle, variant)
    manifest = read_manifest(variant)
    ensure_variant(variant, manifest, ("lora", 2), check=False)
    write_manifest(variant, manifest)
    opts = BenchOptions(backends=["onnxruntime"], threads=1, warmup=0, peers=False)
    rep = run_generate(variant, opts, QUICK)
    skipped = {s["what"]: s["reason"] for s in rep["skipped"]}
    assert "generate lora-unfused" not in skipped and "no sira graph" in skipped[
        "generate sira-unfused"]
    assert {r["case"] for r in rep["generate"]["decode"]} == OURS | {"lora-unfused"}


def test_schema_rejects_a_malformed_generate_section(report):
    rep = report[0]
    validate_report(rep)

    def broken(edit):
        bad = copy.deepcopy(rep)
        edit(bad["generate"])
        with pytest.raises(ConfigError):
            validate_report(bad)

    broken(lambda g: g.pop("decode"))
    broken(lambda g: g["decode"][0].update(case="bogus"))
    broken(lambda g: g["decode"][0].update(backend="llama.cpp"))
    broken(lambda g: g["decode"][0].update(p50_ms=g["decode"][0]["p99_ms"] + 1))
    broken(lambda g: g["first_token"][0].pop("prefill_tok_s"))
    broken(lambda g: g["switch"][0].update(method="teleport"))
    broken(lambda g: g["load"][0].update(n=0))
    broken(lambda g: g.__setitem__("ratios", [{"what": "context"}]))


def test_refusals_before_anything_loads(tiny):
    _, bundle = tiny
    runner = CliRunner()
    res = runner.invoke(main, ["bench", str(bundle), "--generate", "--contexts", "1000"])
    assert res.exit_code == 2 and "max-context" in res.output
    res = runner.invoke(main, ["bench", str(bundle), "--generate", "--write-policy", "p.json"])
    assert res.exit_code == 2 and "--write-policy" in res.output
    with pytest.raises(ConfigError, match="decode_steps"):
        GenerateOptions(decode_steps=0).check(96, 0)
