"""The quickstart: on MiniLM + Rotten Tomatoes, the frozen model (a linear probe on the frozen
encoder) against a SHiRA and a LoRA adapter of equal trainable parameters, briefly trained.

``run_quickstart`` returns its rows so later steps (export, switching, latency) can extend the
same table; ``quickstart_runs`` is the list of runs it trains.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeadapt.train.trainer import TrainConfig, train


@dataclass
class QuickstartConfig:
    out: str = "runs/quickstart"
    model: str = "minilm"
    task: str = "rt-sentiment"
    max_train: int = 600
    max_test: int = 500
    epochs: float = 1.0
    rank: int = 8          # LoRA r; SHiRA gets the same parameter budget
    seed: int = 0
    progress: bool = True


def quickstart_runs(qc: QuickstartConfig) -> list[tuple[str, str, TrainConfig]]:
    """(name, description, config) of each run, the frozen baseline first."""
    common = dict(model=qc.model, task=qc.task, max_train=qc.max_train, max_test=qc.max_test,
                  epochs=qc.epochs, seed=qc.seed)
    return [
        ("frozen", "frozen encoder + trained linear head",
         TrainConfig(method="none", **common)),
        ("shira", f"SHiRA snip mask, q/v, budget = LoRA r={qc.rank}",
         TrainConfig(method="shira", adapter={"mask": "snip", "budget_rank": qc.rank,
                                              "seed": qc.seed}, **common)),
        ("lora", f"LoRA r={qc.rank}, q/v",
         TrainConfig(method="lora", adapter={"r": qc.rank}, **common)),
    ]


def run_quickstart(qc: QuickstartConfig, echo: Callable[[str], Any] = print
                   ) -> list[dict[str, Any]]:
    """Train each quickstart run into ``<out>/<name>/`` and print the comparison table.

    Returns one row per run: name, description, accuracy, trainable params, seconds, run dir.
    """
    rows = []
    started = time.perf_counter()
    echo(f"edgeadapt quickstart: {qc.model} on {qc.task} ({qc.max_train} training / "
         f"{qc.max_test} test examples, {qc.epochs:g} epoch)")
    for name, description, cfg in quickstart_runs(qc):
        run_dir = Path(qc.out) / name
        echo(f"- training {name}: {description}")
        metrics = train(cfg, out=run_dir, progress=qc.progress).metrics
        rows.append({"name": name, "description": description,
                     "accuracy": metrics["test"]["accuracy"],
                     "adapter_params": metrics["trainable_params"],
                     "head_params": metrics["head_params"],
                     "seconds": metrics["wall_s"], "run": str(run_dir)})
    echo("")
    echo(format_table(rows))
    echo(f"\ntotal {time.perf_counter() - started:.0f} s; runs in {qc.out}/ "
         "(load one with edgeadapt.train.load_run)")
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Accuracy per run, with its gain over the first (frozen) row, in points."""
    base = rows[0]["accuracy"]
    lines = [f"{'run':<8} {'test accuracy':>13} {'vs frozen':>10} {'adapter params':>15} "
             f"{'seconds':>8}  what"]
    for r in rows:
        gain = "" if r is rows[0] else f"{100 * (r['accuracy'] - base):+.1f} pt"
        lines.append(f"{r['name']:<8} {r['accuracy']:>13.4f} {gain:>10} "
                     f"{r['adapter_params']:>15,} {r['seconds']:>8.0f}  {r['description']}")
    return "\n".join(lines)
