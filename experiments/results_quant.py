"""Quantized bases (issue 20, docs/results.md section 8): each adapter evaluated on the PyTorch
reference of an int8 / int4 bundle.

    .venv/bin/python -m experiments.results_quant [--seeds 0,1,2]

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

Writes runs/mp/quant.json; docs/results.md renders it (experiments/results_doc/quantized.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from edgeadapt.adapters.reference import carrying
from edgeadapt.export.adapter import load_run_adapter
from edgeadapt.format.container import atomic_write_bytes
from edgeadapt.format.quant_adapter import round_to_grid
from edgeadapt.models import load_model
from edgeadapt.models.quantized import quantize_reference_
from edgeadapt.tasks import load_task
from edgeadapt.train import load_run
from edgeadapt.train.data import encode_task
from edgeadapt.train.objective import evaluate

RUNS = Path("runs/mp")
OUT = RUNS / "quant.json"
PRECISIONS = ("int8", "int4")
SEEDS = (0, 1, 2)
NOISE_BATCH = 63
MAX_TEST, MAX_LEN = 1000, 64


def shira_run(seed: int) -> str:
    return f"rt2k-shira-qv-snip-b8-lin-s{seed}"


def lora_run(seed: int) -> str:
    return f"rt2k-lora-qv-r8-lin-s{seed}"


def qat_run(precision: str, seed: int) -> str:
    return f"rt2k-shira-qv-snip-b8-lin-{precision}qat-s{seed}"


def run_names(seeds) -> list[str]:
    """Every run this evaluates, for ``seeds``."""
    return [n for s in seeds for n in (shira_run(s), lora_run(s),
                                       *(qat_run(p, s) for p in PRECISIONS))]


def accuracy(lm, batch_size: int = 64) -> float:
    """Test accuracy, evaluated as the trainer does (batches of 64 sorted by length)."""
    task = load_task("rt-sentiment", seed=0, max_train=16, max_test=MAX_TEST)
    enc = encode_task(lm, task, MAX_LEN)
    return float(evaluate(lm, enc, batch_size=batch_size, progress=False)["accuracy"])


def accuracies(lm) -> dict:
    """``accuracy`` and ``accuracy_b63``: the same in batches of 63, which changes nothing but
    the float rounding of the padded batches (activations are quantized per token)."""
    return {"accuracy": accuracy(lm), "accuracy_b63": accuracy(lm, NOISE_BATCH)}


def quantized_base(model: str, precision: str, live: list[str]):
    lm = load_model(model, num_labels=2, seed=0)
    quantize_reference_(lm, precision, live=live)
    return lm


def rounded(run: str, precision: str) -> dict:
    """fp32 SHiRA ``run`` rounded onto the ``precision`` grid, on the quantized reference."""
    adapter, _ = load_run_adapter(RUNS / run)
    model = adapter.meta["model"]
    params = dict(load_model(model, num_labels=2, seed=0).model.named_parameters())
    base = {n: params[n].detach().numpy() for n in adapter.targets}
    on_grid, saturated = round_to_grid(adapter, base, precision)
    lm = quantized_base(model, precision, list(adapter.targets))
    with carrying(lm, on_grid):
        accs = accuracies(lm)
    return {**accs, "saturated": sum(saturated.values()),
            "values": sum(len(d.indices) for d in adapter.targets.values())}


def lora_on(run: str, precision: str) -> dict:
    lm, info = load_run(RUNS / run)
    quantize_reference_(lm, precision, live=list(info["weight_sha256"]))
    return accuracies(lm)


def qat_exported(run: str, precision: str) -> dict:
    adapter, _ = load_run_adapter(RUNS / run)
    assert adapter.meta.get("quant") == precision, adapter.meta
    lm = quantized_base(adapter.meta["model"], precision, list(adapter.targets))
    with carrying(lm, adapter):
        accs = accuracies(lm)
    trained = json.loads((RUNS / run / "metrics.json").read_text())
    return {**accs, "trained_accuracy": trained["test"]["accuracy"],
            "saturated": trained["quant"]["saturated"]}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = collect([int(s) for s in args.seeds.split(",")])
    atomic_write_bytes(OUT, [json.dumps(result, indent=1).encode()])
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
