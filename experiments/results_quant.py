"""Quantized bases (issue 20, docs/results.md section 8): each adapter evaluated on the PyTorch
reference of an int8 / int4 bundle.

    .venv/bin/python -m experiments.results_quant [--seeds 0,1,2]
    .venv/bin/python -m experiments.results_quant --model smollm2 [--resume]

Needs the runs of experiments/results_quality.py: section 1.0's fp32 SHiRA and LoRA r=8
(``rt2k-{shira-qv-snip-b8,lora-qv-r8}-lin-s<i>``) and the quantization-aware SHiRA runs
(``rt2k-shira-qv-snip-b8-lin-{int8,int4}qat-s<i>``). The quantized base is
``edgeadapt.models.quantized.quantize_reference_`` (every encoder Linear on the grid; q/v live,
weight-only; the rest with MatMulNBits' int8 activation quantization), evaluated on the run's
fixed 1,000 test examples:

- fp32 SHiRA, post-training rounding: the run's adapter (``load_run_adapter``: values and head)
  rounded onto the base's grid (``edgeadapt.format.quant_adapter.round_to_grid``, saturated
  entries counted), fused into the quantized reference's codes (``carrying``);
- LoRA r=8: its run reloaded and the base under it quantized (unfused LoRA on the quantized base);
- QAT SHiRA: the exported adapter (grid deltas, ``meta["quant"]``) fused into the codes of a
  fresh quantized reference; beside the accuracy the run measured at the end of training.

Every quantized row is also evaluated in batches of 63 instead of 64 (``accuracy_b63``): the
noise of the quantized forward itself.

SmolLM2-135M (``--model smollm2``, seed 0): section 7's fp32 SHiRA and LoRA r=8 runs
(``sm-{hamlet,rt}-{shira-snip-b8,lora-r8}``) and their quantization-aware twins
(``sm-*-shira-snip-b8-<p>qat``, each evaluated when it exists), the same rows (int8, int4,
int4-affine and int4-affine-live8) on a quantized base whose LM head is on the grid too
(``quantized_weight_names``), plus the fp32 and quantized bases alone
(zero-shot); each evaluated as its run was (Hamlet: perplexity on the held-out blocks; Rotten
Tomatoes: accuracy of the label-word logits on the run's 400 test examples), in one batching
only.

Writes runs/mp/quant.json (MiniLM) or runs/mp/quant-smollm2.json; docs/results.md renders them
(experiments/results_doc/quantized.py).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from edgeadapt.adapters.reference import carrying
from edgeadapt.export.adapter import load_run_adapter
from edgeadapt.format.container import atomic_write_bytes
from edgeadapt.format.quant import live_grid
from edgeadapt.format.quant_adapter import round_to_grid
from edgeadapt.models import load_model
from edgeadapt.models.quantized import quantize_reference_
from edgeadapt.tasks import load_task
from edgeadapt.train import load_run
from edgeadapt.train.data import encode_task
from edgeadapt.train.objective import evaluate
from edgeadapt.train.run import read_run_info

RUNS = Path("runs/mp")
OUT = RUNS / "quant.json"
OUT_SM = RUNS / "quant-smollm2.json"
PRECISIONS = ("int8", "int4")
#: SmolLM2 came from a Q4_1 GGUF: its int4 rows also on the affine grid that holds it, and on
#: that grid with the live weights (q/v) on int8
SM_PRECISIONS = (*PRECISIONS, "int4-affine", "int4-affine-live8")
SEEDS = (0, 1, 2)
NOISE_BATCH = 63
MAX_TEST, MAX_LEN = 1000, 64
SM_TASKS = ("hamlet", "rt")


@dataclass(frozen=True)
class Eval:
    """How a row is evaluated: the run's test split, its metric (the trainer's ``evaluate``)
    and, with ``noise``, the same again in batches of ``NOISE_BATCH``."""
    task: str = "rt-sentiment"
    max_test: int | None = MAX_TEST
    max_len: int = MAX_LEN
    max_train: int | None = 16
    seed: int = 0
    batch_size: int = 64
    noise: bool = True


MINILM = Eval()


def shira_run(seed: int) -> str:
    return f"rt2k-shira-qv-snip-b8-lin-s{seed}"


def lora_run(seed: int) -> str:
    return f"rt2k-lora-qv-r8-lin-s{seed}"


def qat_run(precision: str, seed: int) -> str:
    return f"rt2k-shira-qv-snip-b8-lin-{precision}qat-s{seed}"


def sm_run(task: str, kind: str) -> str:
    """SmolLM2 run names: ``kind`` is ``none``, ``shira-snip-b8``, ``lora-r8`` or
    ``shira-snip-b8-<precision>qat``."""
    return f"sm-{task}-{kind}"


def sm_run_names() -> list[str]:
    return [sm_run(t, k) for t in SM_TASKS for k in (
        "shira-snip-b8", "lora-r8", *(f"shira-snip-b8-{p}qat" for p in SM_PRECISIONS))]


def run_names(seeds) -> list[str]:
    """Every run this evaluates, for ``seeds``."""
    return [n for s in seeds for n in (shira_run(s), lora_run(s),
                                       *(qat_run(p, s) for p in PRECISIONS))]


def trained_metrics(run: str) -> dict:
    return json.loads((RUNS / run / "metrics.json").read_text())


def run_eval(run: str) -> Eval:
    """The evaluation ``run`` did at the end of its training (its task split, one batching)."""
    cfg = trained_metrics(run)["config"]
    return Eval(cfg["task"], cfg["max_test"], cfg["max_len"], cfg["max_train"], cfg["seed"],
                cfg["eval_batch_size"], noise=False)


def score(lm, ev: Eval) -> tuple[str, float]:
    """(metric, value): the test accuracy or perplexity, evaluated as the trainer does (batches
    sorted by length)."""
    task = load_task(ev.task, seed=ev.seed, max_train=ev.max_train, max_test=ev.max_test)
    enc = encode_task(lm, task, ev.max_len)
    got = evaluate(lm, enc, batch_size=ev.batch_size, progress=False)
    return task.metric, float(got[task.metric])


def accuracies(lm, ev: Eval = MINILM) -> dict:
    """``accuracy`` (or ``perplexity``) and, with ``ev.noise``, ``accuracy_b63``: the same in
    batches of 63, which changes nothing but the float rounding of the padded batches
    (activations are quantized per token)."""
    key, value = score(lm, ev)
    out = {key: value}
    if ev.noise:
        out[f"{key}_b63"] = score(lm, replace(ev, batch_size=NOISE_BATCH))[1]
    return out


def quantized_base(model: str, precision: str, live: list[str]):
    lm = load_model(model, num_labels=2, seed=0)
    quantize_reference_(lm, precision, live=live)
    return lm


def rounded(run: str, precision: str, ev: Eval = MINILM) -> dict:
    """fp32 SHiRA ``run`` rounded onto the ``precision`` grid, on the quantized reference."""
    adapter, _ = load_run_adapter(RUNS / run)
    model = adapter.meta["model"]
    params = dict(load_model(model, num_labels=2, seed=0).model.named_parameters())
    base = {n: params[n].detach().numpy() for n in adapter.targets}
    on_grid, saturated = round_to_grid(adapter, base, precision)
    lm = quantized_base(model, precision, list(adapter.targets))
    with carrying(lm, on_grid):
        accs = accuracies(lm, ev)
    return {**accs, "saturated": sum(saturated.values()),
            "values": sum(len(d.indices) for d in adapter.targets.values())}


def lora_on(run: str, precision: str, ev: Eval = MINILM) -> dict:
    lm, info = load_run(RUNS / run)
    quantize_reference_(lm, precision, live=list(info["weight_sha256"]))
    return accuracies(lm, ev)


def qat_exported(run: str, precision: str, ev: Eval = MINILM) -> dict:
    adapter, _ = load_run_adapter(RUNS / run)
    assert adapter.meta.get("quant") == live_grid(precision).name, adapter.meta
    lm = quantized_base(adapter.meta["model"], precision, list(adapter.targets))
    with carrying(lm, adapter):
        accs = accuracies(lm, ev)
    trained = trained_metrics(run)
    key = trained["metric"]
    return {**accs, f"trained_{key}": trained["test"][key],
            "saturated": trained["quant"]["saturated"],
            "values": sum(len(d.indices) for d in adapter.targets.values())}


def base_alone(run: str, precision: str, ev: Eval) -> dict:
    """The quantized base with no adapter (zero-shot), quantized as under ``run`` (its targets
    live)."""
    info, _ = read_run_info(RUNS / run)
    return accuracies(quantized_base(info["model"], precision, list(info["weight_sha256"])), ev)


def collect(seeds: list[int]) -> dict:
    out: dict = {"seeds": seeds, "max_test": MAX_TEST, "rows": {}}
    for seed in seeds:
        rows: dict = {}
        for kind, run in (("shira", shira_run(seed)), ("lora", lora_run(seed))):
            if not (RUNS / run / "metrics.json").exists():
                continue
            trained = json.loads((RUNS / run / "metrics.json").read_text())
            rows[kind] = {"run": run, "fp32": trained["test"]["accuracy"]}
            for p in PRECISIONS:
                rows[kind][p] = rounded(run, p) if kind == "shira" else lora_on(run, p)
        for p in PRECISIONS:
            if (RUNS / qat_run(p, seed) / "metrics.json").exists():
                rows[f"qat-{p}"] = {"run": qat_run(p, seed),
                                    p: qat_exported(qat_run(p, seed), p)}
        out["rows"][str(seed)] = rows
        print(json.dumps({seed: rows}, indent=1), flush=True)
    return out


def collect_smollm2(previous: dict | None = None, tasks=SM_TASKS) -> dict:
    """SmolLM2, seed 0: per task, the rows of ``collect`` plus ``base`` (zero-shot: the fp32
    base and the quantized bases alone); each row keeps the run's metric (``perplexity`` or
    ``accuracy``) and the run's own end-of-training value (``trained``). With ``previous`` (an
    earlier result), an entry whose run is unchanged (same name and trained value) is kept
    instead of re-evaluated, and a task not evaluated now keeps its rows; the result is written
    to OUT_SM after each new entry."""
    kept = (previous or {}).get("rows", {})
    out: dict = {"seeds": [0], "rows": dict(kept)}
    for task in tasks:
        if (RUNS / sm_run(task, "shira-snip-b8") / "metrics.json").exists():
            smollm2_rows(out, task, kept.get(task, {}))
    return out


def smollm2_rows(out: dict, task: str, old: dict) -> None:
    """``task``'s rows of :func:`collect_smollm2`, into ``out["rows"][task]``."""
    shira = sm_run(task, "shira-snip-b8")
    ev, key = run_eval(shira), trained_metrics(shira)["metric"]
    rows = out["rows"][task] = {"metric": key}

    def entry(kind: str, run: str | None, p: str, measure) -> None:
        row = rows.setdefault(kind, {"run": run})
        row["trained"] = trained = trained_metrics(run)["test"][key] if run else None
        was = old.get(kind, {})
        if p in was and was.get("run") == run and was.get("trained") == trained:
            row[p] = was[p]
            return
        row[p] = measure()
        print(json.dumps({task: {kind: row}}), flush=True)
        atomic_write_bytes(OUT_SM, [json.dumps(out, indent=1).encode()])

    # the rows the targets compare first, the zero-shot context last
    for kind, run in (("shira", shira), ("lora", sm_run(task, "lora-r8"))):
        if not (RUNS / run / "metrics.json").exists():
            continue
        entry(kind, run, "fp32", lambda run=run: trained_metrics(run)["test"][key])
        for p in SM_PRECISIONS:
            entry(kind, run, p, lambda run=run, p=p, kind=kind: (
                rounded(run, p, ev) if kind == "shira" else lora_on(run, p, ev)))
            run_qat = sm_run(task, f"shira-snip-b8-{p}qat")
            if kind == "shira" and (RUNS / run_qat / "metrics.json").exists():
                entry(f"qat-{p}", run_qat, p, lambda r=run_qat, p=p: qat_exported(r, p, ev))
    model = read_run_info(RUNS / shira)[0]["model"]
    entry("base", None, "fp32", lambda: score(load_model(model, num_labels=2, seed=0), ev)[1])
    for p in SM_PRECISIONS:
        entry("base", None, p, lambda p=p: base_alone(shira, p, ev))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--model", choices=("minilm", "smollm2"), default="minilm",
                        help="smollm2: section 7's runs, seed 0 (runs/mp/quant-smollm2.json)")
    parser.add_argument("--resume", action="store_true",
                        help="smollm2: keep the entries of quant-smollm2.json whose run is "
                             "unchanged")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.model == "smollm2":
        previous = json.loads(OUT_SM.read_text()) if args.resume and OUT_SM.exists() else None
        result, out = collect_smollm2(previous), OUT_SM
    else:
        result, out = collect([int(s) for s in args.seeds.split(",")]), OUT
    atomic_write_bytes(out, [json.dumps(result, indent=1).encode()])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
