"""experiments/results.py renders docs/results.md from metrics files: numbers, verdicts, missing
runs.

Synthetic metrics.json files in a temporary runs directory; the expected numbers are worked out
by hand in each test. The entry point is ``experiments.results``, the logic lives in its package
``experiments.results_doc`` (importable from the repository root, where pytest runs).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def results() -> ModuleType:
    """experiments/results.py, the entry point (``main``, ``render``)."""
    return importlib.import_module("experiments.results")


@pytest.fixture(scope="module")
def doc(results: ModuleType) -> SimpleNamespace:
    """The modules of experiments/results_doc/."""
    return SimpleNamespace(**{name: importlib.import_module(f"experiments.results_doc.{name}")
                              for name in ("data", "fusion", "sora", "training")})


@pytest.fixture
def runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, doc: SimpleNamespace) -> Path:
    """An empty runs directory and an empty bench directory in place of the real ones."""
    monkeypatch.setattr(doc.data, "RUNS_DIR", tmp_path / "runs")
    monkeypatch.setattr(doc.data, "BENCH_DIR", tmp_path / "bench")
    (tmp_path / "runs").mkdir()
    return tmp_path / "runs"


def write_run(runs: Path, name: str, accuracy: float, *, seed: int = 0, params: int = 73728,
              **extra: object) -> None:
    """A minimal metrics.json as the trainer writes it."""
    m = {"test": {"accuracy": accuracy, "loss": 0.5}, "trainable_params": params,
         "head_params": 768, "train_s": 100.0, "wall_s": 120.0, "steps": 250, "targets": 12,
         "train_loss": [[s, 0.5] for s in range(0, 250, 10)], "config": {"seed": seed},
         "test_examples": 1000, "metric": "accuracy", **extra}
    (runs / name).mkdir()
    (runs / name / "metrics.json").write_text(json.dumps(m))


def issue2_runs(runs: Path, probe: list[float], shira: list[float]) -> None:
    for seed, (p, s) in enumerate(zip(probe, shira, strict=True)):
        write_run(runs, f"rt2k-none-lin-s{seed}", p, seed=seed, params=0)
        write_run(runs, f"rt2k-shira-qv-snip-b8-lin-s{seed}", s, seed=seed)


def claim_row(page: str, claim: str) -> str:
    return next(line for line in page.splitlines() if line.startswith(f"| {claim}"))


def test_issue2_check_met_with_hand_computed_gap(runs: Path, results: ModuleType) -> None:
    # probe 0.70 / 0.74 (mean 0.72, spread 4 points), SHiRA 0.78 / 0.80 (mean 0.79, spread 2):
    # gaps +8.0 / +6.0, mean +7.0 > 4 -> met
    issue2_runs(runs, [0.70, 0.74], [0.78, 0.80])
    page = results.render()
    assert "| frozen encoder + linear head | 0 | 0.700 | 0.500 | 0 (+768 head) | 100 | 120 |" \
        in page
    assert "| SHiRA snip, q/v, budget = LoRA r=8 | 1 | 0.800 | 0.500 | 73,728 | 100 | 120 |" in page
    assert "the issue's check is met" in page
    assert "(+8.0 / +6.0 points, seeds 0 / 1)" in page
    assert "means 0.790 vs 0.720, **+7.0 points**" in page
    row = claim_row(page, "SHiRA beats the frozen probe")
    assert "0.790 vs 0.720 (+7.0 points), ahead with 2 of 2 seeds | yes |" in row
    # seed 2 is defined in results_quality.RUNS but has no metrics.json here
    assert "| frozen encoder + linear head | 2 | (not run) |" in page


def test_issue2_check_not_met_when_gap_within_spread(runs: Path, results: ModuleType) -> None:
    # gaps +2.0 / +1.0, mean +1.5 < the probe's 4-point spread -> not met
    issue2_runs(runs, [0.70, 0.74], [0.72, 0.75])
    page = results.render()
    assert "the issue's check is not met" in page
    assert claim_row(page, "SHiRA beats the frozen probe").endswith("| no |")


def test_missing_runs_render_not_run(runs: Path, results: ModuleType) -> None:
    page = results.render()  # nothing trained, no fusion.json, no bench JSON
    assert "| LoRA r=16 | (not run) |" in page
    assert claim_row(page, "SHiRA beats the frozen probe").endswith("| not measured |")
    assert claim_row(page, "Fusion: LoRA loses more").endswith("| not measured |")
    assert claim_row(page, "SoRA: <= 70% of LoRA r=16's params, within 1 point (3b)").endswith(
        "| not measured |")


def test_sora_target_per_seed(runs: Path, results: ModuleType) -> None:
    # LoRA r=16: 147,456 params. seed 0: kept 86,016 (58.3%), 3.4 points behind -> miss;
    # seed 1: kept 101,376 (68.8%), level -> met; seed 2: kept 110,592 (75.0%) -> miss
    sora = {"r_max": 16, "live_ranks": {"q": 8}, "live_rank_total": 8}
    for seed, (lora, acc, kept) in enumerate([(0.778, 0.744, 86016), (0.770, 0.770, 101376),
                                              (0.776, 0.776, 110592)]):
        write_run(runs, f"rt-lora-r16-1ep-lin-s{seed}", lora, seed=seed, params=147456)
        write_run(runs, f"rt-sora-r16-linear-1ep-lin-s{seed}", acc, seed=seed, params=147648,
                  sora={**sora, "params_after": kept})
    page = results.render()
    row = claim_row(page, "SoRA: <= 70% of LoRA r=16's params, within 1 point (3b)")
    assert row.endswith("| partly (1 of 3 seeds) |")
    assert "86,016 (58.3%) | 101,376 (68.8%) | 110,592 (75.0%) | 67.4%" in page


def test_rounding_is_half_up_on_float32_noise(doc: SimpleNamespace) -> None:
    assert doc.data.num(0.8174999952316284) == "0.818"  # 327 / 400 stored as float32
    assert doc.data.pts(-0.0535) == "-5.4"
    assert doc.data.pts(-1e-9) == "+0.0"


def test_render_only_writes_atomically(runs: Path, results: ModuleType, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # main() changes into the repository; restored afterwards
    out = tmp_path / "page.md"
    results.main(["--render-only", "--out", str(out)])
    assert out.read_text().startswith("# Results")
    assert [p.name for p in tmp_path.iterdir() if "page.md" in p.name] == ["page.md"]


def fusion_rows(task_runs: dict[str, str], alone: float, fused: float) -> dict:
    return {"tasks": {task: {"run": run, "alone": alone, "fused": fused,
                             "loss_points": 100 * (alone - fused),
                             "loss_relative_pct": 100 * (alone - fused) / alone}
                      for task, run in task_runs.items()}, "mask_overlap": None}


@pytest.mark.parametrize(("lora_fused", "verdict"), [(0.762, "direction only (within noise)"),
                                                     (0.736, "yes"), (0.780, "no")])
def test_fusion_verdict(runs: Path, results: ModuleType, doc: SimpleNamespace, lora_fused: float,
                        verdict: str) -> None:
    # rt: both adapters 0.776 alone (probe 0.772). SHiRA fused 0.772 loses 0.4 points; LoRA loses
    # 1.4 / 4.0 / -0.4. One binomial SE at 0.776 on 500 examples: sqrt(.776 * .224 / 500) = 1.9
    # points, so 1.0 points more is noise, 3.6 is not, and a LoRA gain is "no".
    # politics: adapters 0.550 alone under the probe's 0.660 -> not a concept-loss measurement.
    write_run(runs, "rt-none-2ep", 0.772, params=0, test_examples=500)
    write_run(runs, "pol-none-2ep", 0.660, params=0, test_examples=500)
    write_run(runs, "rt-lora-r8-2ep", 0.776, test_examples=500)
    shira = fusion_rows({"rt-sentiment": "rt-shira-snip-b8-2ep"}, 0.776, 0.772)
    lora = fusion_rows({"rt-sentiment": "rt-lora-r8-2ep"}, 0.776, lora_fused)
    pol = fusion_rows({"politics": "pol-shira-snip-b8-2ep"}, 0.550, 0.558)
    shira["tasks"].update(pol["tasks"])
    (runs / "fusion.json").write_text(json.dumps([
        {**shira, "method": doc.fusion.FUSION_SHIRA}, {**lora, "method": doc.fusion.FUSION_LORA}]))
    page = results.render()
    assert claim_row(page, "Fusion: LoRA loses more").endswith(f"| {verdict} |")
    assert "one SE 1.9" in claim_row(page, "Fusion: LoRA loses more")
    assert "**politics cannot measure concept loss**" in " ".join(page.split())  # re-wrapped


def test_full_run_trains_missing_then_excluding_runs(runs: Path, doc: SimpleNamespace,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    done: list[str] = []
    monkeypatch.setattr(doc.training.rq, "RUNS", {"b-excl": ["--exclude-run", "x"], "a": [],
                                             "have": []})
    write_run(runs, "have", 0.7)

    def fake_train(name: str) -> None:
        done.append(name)
        write_run(runs, name, 0.7)

    monkeypatch.setattr(doc.training.rq, "train", fake_train)
    doc.training.train_missing(jobs=2)
    assert done == ["a", "b-excl"]  # the trained run is skipped; --exclude-run waits


def define_runs(monkeypatch: pytest.MonkeyPatch, doc: SimpleNamespace,
                runs: dict[str, list[str]]) -> None:
    """Add run definitions to results_quality.RUNS for this test only."""
    for name, args in runs.items():
        monkeypatch.setitem(doc.data.rq.RUNS, name, args)


def test_sora_2b_target_per_seed_and_on_the_mean(runs: Path, results: ModuleType,
                                                 doc: SimpleNamespace,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # LoRA r=16: 147,456 params, 0.800 / 0.790 (mean 0.795). SoRA xi 2.5e-4 -> 3.75e-3:
    # seed 0 keeps 100,000 (67.8%), 0.795 (0.5 behind) -> met; seed 1 keeps 110,000 (74.6%),
    # 0.790 -> missed (params). Means: 71.2% kept -> not met on the mean either.
    sora = {"r_max": 16, "live_ranks": {"q": 8}, "live_rank_total": 8}
    args = ["--max-test", "1000", "--xi", "2.5e-4", "--sora-xi-max", "3.75e-3"]
    define_runs(monkeypatch, doc, {f"{stem}-s{s}": args for s in (0, 1) for stem in
                                   ("rt2k-lora-r16-lin", "rt2k-sora-r16-x3.75e-3-lin")})
    for stem in (*doc.sora.SORA_2B, doc.sora.LORA_2B):  # seeds 0 and 1 only
        monkeypatch.delitem(doc.data.rq.RUNS, f"{stem}-s2", raising=False)
    for seed, (lora, acc, kept) in enumerate([(0.800, 0.795, 100000), (0.790, 0.790, 110000)]):
        write_run(runs, f"rt2k-lora-r16-lin-s{seed}", lora, seed=seed, params=147456)
        write_run(runs, f"rt2k-sora-r16-x3.75e-3-lin-s{seed}", acc, seed=seed, params=147648,
                  sora={**sora, "params_after": kept}, stages=[])
    page = results.render()
    row = claim_row(page, "SoRA: <= 70% of LoRA r=16's params, within 1 point (2b, xi 2.5e-4")
    assert row.endswith("| partly (1 of 2 seeds) |")
    assert "keeps 71.2% of the params, 0.793 vs LoRA 0.795" in row
    assert "on the means: not met" in row
    assert "| target met (<= 70% kept, within 1 point) | yes | no | no |" in page
    assert "100,000 (67.8%) | 110,000 (74.6%) | 71.2%" in page
    # one binomial SE at 0.795 on 1,000 examples: sqrt(.795 * .205 / 1000) = 1.28 points
    assert "binomial standard error is 1.3 points on this section's 1,000" in " ".join(page.split())


def test_sira_3c_seed_table_and_claim(runs: Path, results: ModuleType) -> None:
    # LoRA 0.840 / 0.830 (mean 0.835), SiRA 0.845 / 0.835 (mean 0.840): +0.5 both seeds -> yes
    for seed, (lora, sira) in enumerate([(0.840, 0.845), (0.830, 0.835)]):
        halves = {"accuracy/rt": 0.770, "accuracy/subj": 2 * lora - 0.770}
        write_run(runs, f"mixs-lora-r10-1ep-lin-s{seed}", lora, seed=seed, params=92160)
        write_run(runs, f"mixs-sira-e4r2-1ep-lin-s{seed}", sira, seed=seed, params=92160)
        for name, acc in ((f"mixs-lora-r10-1ep-lin-s{seed}", lora),
                          (f"mixs-sira-e4r2-1ep-lin-s{seed}", sira)):
            m = json.loads((runs / name / "metrics.json").read_text())
            m["test"].update({**halves, "accuracy/subj": 2 * acc - 0.770})
            (runs / name / "metrics.json").write_text(json.dumps(m))
    # LoRA seed 2 alone (0.700) stays out of the means: SiRA has no seed 2 to compare with
    write_run(runs, "mixs-lora-r10-1ep-lin-s2", 0.700, seed=2, params=92160,
              test={"accuracy": 0.700, "accuracy/rt": 0.7, "accuracy/subj": 0.7, "loss": 0.5})
    page = results.render()
    assert "| LoRA r=10, rt+subjectivity mean | 0.840 | 0.830 | 0.700 | 0.835 |" in page
    assert "The mean column averages seeds 0 / 1 only" in page
    row = claim_row(page, "SiRA >= LoRA multi-task, equal params (3c, rt+subjectivity)")
    assert "mean accuracy 0.840 vs LoRA 0.835 (+0.5 points; ahead with 2 of 2 seeds)" in row
    assert row.endswith("| yes |")
    assert "| SiRA E=4 r=2 top-2, rt+subjectivity mean | 0.845 | 0.835 | (not run) | 0.840 |" \
        in page
    # subj halves: 2 * 0.840 - 0.770 = 0.910 and 0.890, mean 0.900
    assert "| (rt / subjectivity halves, LoRA) | 0.770 / 0.910 | 0.770 / 0.890 | 0.700 / 0.700 | " \
        "0.770 / 0.900 |" in page


def test_fusion_claim_uses_every_learned_task(runs: Path, results: ModuleType,
                                              doc: SimpleNamespace) -> None:
    # rt with politics: LoRA loses 4.0 points, SHiRA 0.4 (SE 1.9) -> yes. rt with subjectivity:
    # the same. subjectivity: adapters 0.900 alone beat the probe's 0.880; LoRA loses 0.2, SHiRA
    # 1.0 -> no. So the claim is mixed; politics (under its probe) is left out.
    for name, acc in (("rt-none-2ep", 0.772), ("pol-none-2ep", 0.660), ("subj-none-2ep", 0.880),
                      ("rt-lora-r8-2ep", 0.776), ("subj-lora-r8-2ep", 0.900),
                      ("pol-shira-snip-b8-2ep", 0.550)):
        write_run(runs, name, acc, params=0 if "none" in name else 73728, test_examples=500)
    rt_shira = fusion_rows({"rt-sentiment": "rt-shira-snip-b8-2ep"}, 0.776, 0.772)
    rt_lora = fusion_rows({"rt-sentiment": "rt-lora-r8-2ep"}, 0.776, 0.736)
    pol = fusion_rows({"politics": "pol-shira-snip-b8-2ep"}, 0.550, 0.558)
    subj_shira = fusion_rows({"subjectivity": "subj-shira-snip-b8-2ep"}, 0.900, 0.890)
    subj_lora = fusion_rows({"subjectivity": "subj-lora-r8-2ep"}, 0.900, 0.898)
    (_, lora_p, shira_p, _), (_, lora_s, shira_s, _) = doc.fusion.FUSION_PAIRINGS
    rows = [(shira_p, [rt_shira, pol]), (lora_p, [rt_lora, pol]),
            (shira_s, [rt_shira, subj_shira]), (lora_s, [rt_lora, subj_lora])]
    (runs / "fusion.json").write_text(json.dumps([
        {"method": method, "mask_overlap": None,
         "tasks": {k: v for part in parts for k, v in part["tasks"].items()}}
        for method, parts in rows]))
    page = results.render()
    row = claim_row(page, "Fusion: LoRA loses more than SHiRA, on every learned task")
    assert "rt-sentiment (fused with politics): LoRA -5.2%, SHiRA -0.5%" in row
    assert "rt-sentiment (fused with subjectivity): LoRA -5.2%" in row
    assert "subjectivity (fused with rt-sentiment): LoRA -0.2%, SHiRA -1.1% (difference -0.8" in row
    assert "politics (fused" not in row
    assert row.endswith("| mixed: rt-sentiment (fused with politics) yes; rt-sentiment (fused "
                        "with subjectivity) yes; subjectivity (fused with rt-sentiment) no |")


def test_switch_targets_use_the_paired_ratio_where_the_report_has_it(results: ModuleType) -> None:
    """Section 5 and its claims take a switch row's per-round ``ratio_vs_shira`` (run 10 on) and
    fall back to the ratio of the two p50s for older reports; values worked out by hand."""
    sw = importlib.import_module("experiments.results_doc.switching")

    def report(paired: bool) -> dict:
        rows = [("shira", "live", 2.0, 1.0), ("lora-fuse", "live", 50.0, 30.0),
                ("reload", "repack", 900.0, 300.0)]
        live = zip(sw.SHAPES, (1.0, 1.01, 1.03), strict=True)
        return {"forward": [{"backend": "b", "variant": "shira-live", "batch": b, "seq": s,
                             "ratio_vs_base": v} for (b, s), v in live],
                "switch": [{"backend": "b", "method": m, "mode": mo, "p50_ms": p,
                            **({"ratio_vs_shira": r} if paired else {})}
                           for m, mo, p, r in rows],
                "floor": {"measured_over_floor": {"b": 1.6}}}

    paired = sw.bench_targets(report(True), "b")
    assert [(v, ok) for _, v, ok in paired] == [(1.03, False), (30.0, True), (300.0, True),
                                                (1.6, False)]
    old = sw.bench_targets(report(False), "b")
    assert [v for _, v, _ in old][1:3] == [25.0, 450.0]  # 50 / 2, 900 / 2
    assert sw.bench_cell(report(True), "b", "reload") == "900.0 ms (300x)"
    assert sw.bench_cell(report(False), "b", "lora-fuse") == "50.0 ms (25x)"


def test_section_8_quantized_bases(runs):
    quantized = importlib.import_module("experiments.results_doc.quantized")
    assert "quant.json is missing" in quantized.section_8()
    rows = {"shira": {"run": "a", "fp32": 0.785, "int8": {"accuracy": 0.783, "saturated": 0},
                      "int4": {"accuracy": 0.770, "accuracy_b63": 0.772, "saturated": 1200}},
            "qat-int4": {"run": "b", "int4": {"accuracy": 0.780, "trained_accuracy": 0.780,
                                              "saturated": 0}}}
    (runs / "quant.json").write_text(json.dumps({"seeds": [0], "rows": {"0": rows}}))
    page = quantized.section_8()
    assert ("| SHiRA, fp32-trained, rounded onto int4 | 0.770 (1,200 sat.) | (not run) | "
            "(not run) | 0.770 |") in page
    assert "| LoRA r=8 (fp32 base) | (not run) | (not run) | (not run) |  |" in page
    assert ("int8: SHiRA rounded after training: -0.2 points against fp32 SHiRA (seed 0; "
            "target: within 0.3): met.") in page
    assert ("int4: SHiRA rounded after training: -1.5 points against fp32 SHiRA (seed 0; "
            "target: within 1): not met.") in page
    assert "int4: quantization-aware SHiRA: -0.5 points" in page
    assert "int8: quantization-aware SHiRA: not measured." in page
    assert "other float rounding), its rows move by 0.2 points at most (mean 0.20)" in page
    assert "re-measures the run's own accuracy in all 1 runs." in page


def test_section_8_smollm2(runs):
    quantized = importlib.import_module("experiments.results_doc.quantized")
    assert "quant-smollm2.json is missing" in quantized.section_8_smollm2()
    hamlet = {"metric": "perplexity",
              "base": {"run": None, "fp32": 73.3, "int8": {"perplexity": 73.5}},
              "shira": {"run": "a", "fp32": 40.0, "int8": {"perplexity": 40.4, "saturated": 5,
                                                          "values": 1000},
                        "int4": {"perplexity": 41.2, "saturated": 50, "values": 1000}},
              "qat-int4": {"run": "b", "int4": {"perplexity": 40.6, "trained_perplexity": 40.6,
                                                "saturated": 40, "values": 1000}}}
    rt = {"metric": "accuracy",
          "shira": {"run": "c", "fp32": 0.8175, "int8": {"accuracy": 0.815}},
          "lora": {"run": "d", "fp32": 0.83, "int8": {"accuracy": 0.83},
                   "int4": {"accuracy": 0.82}, "int4-affine": {"accuracy": 0.835}}}
    (runs / "quant-smollm2.json").write_text(
        json.dumps({"seeds": [0], "rows": {"hamlet": hamlet, "rt": rt}}))
    page = quantized.section_8_smollm2()
    # brackets: against the same kind's fp32 value (perplexity relative, accuracy in points)
    assert "| Hamlet (perplexity) | zero-shot (the base alone) | 73.30 | 73.50 (+0.3%) |" in page
    assert "| 40.00 | 40.40 (+1.0%) | 41.20 (+3.0%) |" in page
    assert "| - | (not run) | 40.60 (+1.5%) |" in page
    assert ("int8, SHiRA rounded after training: 40.40, +1.0% against fp32 SHiRA's 40.00 "
            "(target: within 2%): met.") in page
    assert "int4, SHiRA rounded after training: 41.20, +3.0%" in page
    assert "(target: within 2%): not met." in page
    assert ("int8, SHiRA rounded after training: 0.815, -0.25 pts against fp32 SHiRA's 0.818 "
            "(target: within 0.3 points): met.") in page
    assert "int4, quantization-aware SHiRA: not measured." in page
    assert "int4 0.820 (-1.00 pts against its fp32 0.830)" in page
    assert "int4-affine 0.835 (+0.50 pts against its fp32 0.830)" in page
    assert ("| task | run | fp32 base | int8 base | int4 base | int4-affine base | "
            "int4-affine-live8 base |") in page
    assert "int4-affine, quantization-aware SHiRA: not measured." in page
    assert ("Over the base each sits on (its zero-shot value): fp32 SHiRA 73.30 -> 40.00 "
            "(-45.4%), int8 rounded 73.50 -> 40.40 (-45.0%).") in page
    assert "Hamlet int4 quantization-aware 4.0%" in page
    assert "re-measure: Hamlet int4 40.60 (trained: 40.60)" in page


def test_section_8_int4_affine(runs):
    """Each row's perplexity against fp32 SHiRA trained as long, bold within the 2% target;
    runs not trained render as not run."""
    quantized = importlib.import_module("experiments.results_doc.quantized")
    for name, ppl in (("sm-hamlet-shira-snip-b8", 40.0), ("sm-hamlet-qat-a-b16", 44.0),
                      ("sm-hamlet-shira-snip-b8-int4-affine-live8qat", 40.4),
                      ("sm-hamlet-qat-a-60", 39.0)):
        write_run(runs, name, 0.0, test={"perplexity": ppl, "loss": 3.7}, metric="perplexity")
    page = quantized.section_8_int4_affine()
    assert ("| the same, `--budget-rank 16` (twice the entries) | 30 | 44.00 | +10.0% | "
            "`sm-hamlet-qat-a-b16` |") in page
    assert "| 30 | 40.40 | **+1.0%** | `sm-hamlet-shira-snip-b8-int4-affine-live8qat` |" in page
    assert "| fp32 SHiRA (fp32 base; section 7) | 30 | 40.00 | - |" in page
    # its fp32 reference at 60 steps not trained: no change shown
    assert "| quantization-aware SHiRA, lr 2e-3 | 60 | 39.00 | - | `sm-hamlet-qat-a-60` |" in page
    assert "| the same, `--lr 1e-2` | 30 | (not run) | | |" in page
