"""Multi-adapter fusion (issue 7 section 2): two adapters trained apart, then fused.

    .venv/bin/python -m experiments.results_fusion [--plot docs/fusion.png] [--recheck]
    .venv/bin/python -m experiments.results_fusion --replot --plot docs/fusion.png

Needs the runs of experiments/results_quality.py (rt-*, pol-* and subj-* halves). For each
method, both adapters' deltas are added to one fresh base (``W += dW_1 + dW_2``:
``apply_adapter_torch`` of each, heads left out); each task is then evaluated on its own fixed
test set with its OWN trained head (``Adapter.head``) swapped in. "alone" is the run's own test
accuracy (metrics.json: the same test set, the adapter unmerged; ``--recheck`` also merges each
adapter alone into a fresh base and re-evaluates it, as ``alone_merged``). Writes
runs/mp/fusion.json and prints a markdown table; loss is given in points and relative to "alone"
(the paper's "%"). """

from __future__ import annotations

import dataclasses
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch

from edgeadapt.adapters import apply_adapter_torch
from edgeadapt.export.adapter import load_run_adapter
from edgeadapt.format.container import atomic_write_bytes
from edgeadapt.format.types import Adapter, ShiraDelta
from edgeadapt.models import load_model
from edgeadapt.tasks import load_task
from edgeadapt.train.data import encode_task
from edgeadapt.train.objective import evaluate

RUNS = Path("runs/mp")
PAIRS = {  # method -> {task: run}
    "SHiRA snip (budget = LoRA r=8)": {"rt-sentiment": "rt-shira-snip-b8-2ep",
                                       "politics": "pol-shira-snip-b8-2ep"},
    "LoRA r=8": {"rt-sentiment": "rt-lora-r8-2ep", "politics": "pol-lora-r8-2ep"},
    "SHiRA snip, non-overlapping masks": {"rt-sentiment": "rt-shira-snip-b8-2ep",
                                          "politics": "pol-shira-snip-b8-2ep-excl"},
    # the same with a second task the adapters learn (politics stays at the majority class)
    "SHiRA snip (budget = LoRA r=8), rt + subjectivity": {
        "rt-sentiment": "rt-shira-snip-b8-2ep", "subjectivity": "subj-shira-snip-b8-2ep"},
    "LoRA r=8, rt + subjectivity": {"rt-sentiment": "rt-lora-r8-2ep",
                                    "subjectivity": "subj-lora-r8-2ep"},
    "SHiRA snip, non-overlapping masks, rt + subjectivity": {
        "rt-sentiment": "rt-shira-snip-b8-2ep", "subjectivity": "subj-shira-snip-b8-2ep-excl"},
}
MAX_TRAIN, MAX_TEST, MAX_LEN = 1000, 500, 64


def _accuracy(lm, task_name: str) -> float:
    task = load_task(task_name, seed=0, max_train=MAX_TRAIN, max_test=MAX_TEST)
    enc = encode_task(lm, task, MAX_LEN)
    return float(evaluate(lm, enc, progress=False)["accuracy"])


def mask_overlap(a: Adapter, b: Adapter) -> float | None:
    """Fraction of a's SHiRA positions that b also trains (None for non-SHiRA adapters)."""
    shared = total = 0
    for name, delta in a.targets.items():
        other = b.targets.get(name)
        if not isinstance(delta, ShiraDelta) or not isinstance(other, ShiraDelta):
            return None
        shared += len(np.intersect1d(delta.indices, other.indices))
        total += len(delta.indices)
    return shared / total


def alone_merged(adapter: Adapter, model: str, task: str) -> float:
    """One adapter merged alone into a fresh base (checks the runs' own, unmerged numbers)."""
    lm = load_model(model, num_labels=2, seed=0)
    apply_adapter_torch(lm.model, adapter)
    lm.model.eval()
    return _accuracy(lm, task)


def fuse(method: str, runs: dict[str, str], recheck: bool = False) -> dict:
    loaded = {task: load_run_adapter(RUNS / run) for task, run in runs.items()}
    adapters = {task: adapter for task, (adapter, _) in loaded.items()}
    models = {info["model"] for _, info in loaded.values()}
    assert len(models) == 1, f"runs of different base models: {models}"
    model = models.pop()
    lm = load_model(model, num_labels=2, seed=0)
    for adapter in adapters.values():
        apply_adapter_torch(lm.model, dataclasses.replace(adapter, head={}))
    lm.model.eval()
    rows = {}
    for task, run in runs.items():
        head_only = Adapter(method=adapters[task].method, targets={}, shapes={},
                            weight_sha256={}, head=adapters[task].head)
        apply_adapter_torch(lm.model, head_only)  # this task's own head
        alone = json.loads((RUNS / run / "metrics.json").read_text())["test"]["accuracy"]
        fused = _accuracy(lm, task)
        rows[task] = {"run": run, "alone": alone, "fused": fused,
                      "loss_points": 100 * (alone - fused),
                      "loss_relative_pct": 100 * (alone - fused) / alone}
        if recheck:
            rows[task]["alone_merged"] = alone_merged(adapters[task], model, task)
    a, b = adapters.values()
    return {"method": method, "tasks": rows, "mask_overlap": mask_overlap(a, b)}


def table(results: list[dict]) -> str:
    lines = ["| method | task | alone | fused | loss (points) | loss (relative) |",
             "|---|---|---|---|---|---|"]
    for r in results:
        for task, t in r["tasks"].items():
            lines.append(f"| {r['method']} | {task} | {t['alone']:.3f} | {t['fused']:.3f} | "
                         f"{t['loss_points']:+.1f} | {t['loss_relative_pct']:+.1f}% |")
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(7.0, 1.1 * sum(len(r["tasks"]) for r in results)), 4))
    labels, alone, fused = [], [], []
    for r in results:
        for task, t in r["tasks"].items():
            method = r["method"].split(" (")[0].split(", rt +")[0]
            method = method.replace("SHiRA snip, non-overlapping masks", "SHiRA disjoint")
            labels.append(f"{method}\n{task}")
            alone.append(t["alone"])
            fused.append(t["fused"])
    x = np.arange(len(labels))
    ax.bar(x - 0.2, alone, 0.4, label="alone")
    ax.bar(x + 0.2, fused, 0.4, label="fused (both deltas added)")
    for i, (a, f) in enumerate(zip(alone, fused, strict=True)):
        ax.text(i + 0.2, f + 0.01, f"{100 * (f - a) / a:+.1f}%", ha="center", fontsize=8)
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylim(0.4, 1.0)
    ax.set_ylabel("test accuracy (500 examples)")
    ax.set_title("MiniLM: two adapters trained apart, then fused (seed 0)")
    ax.legend(loc="upper left", ncol=2, fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write_bytes(Path(path), [buf.getvalue()])


def main(argv: list[str]) -> None:
    if "--replot" in argv:  # plot the last results again, nothing recomputed
        results = json.loads((RUNS / "fusion.json").read_text())
    else:
        torch.set_num_threads(1)
        results = [fuse(method, runs, "--recheck" in argv) for method, runs in PAIRS.items()
                   if all((RUNS / r / "metrics.json").exists() for r in runs.values())]
        atomic_write_bytes(RUNS / "fusion.json", [json.dumps(results, indent=1).encode()])
    print(table(results))
    for r in results:
        if r["mask_overlap"] is not None:
            print(f"{r['method']}: {100 * r['mask_overlap']:.1f}% of the SHiRA positions shared")
    if "--plot" in argv:
        plot(results, argv[argv.index("--plot") + 1])


if __name__ == "__main__":
    main(sys.argv[1:])
