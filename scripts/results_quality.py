"""Quality runs behind docs/results.md: each is one `edgeadapt train` command.

    PYTHONPATH=. .venv/bin/python scripts/results_quality.py [run names...]   # trains missing runs
    PYTHONPATH=. .venv/bin/python scripts/results_quality.py --table          # markdown table

Runs land in runs/res/<name>/ (skipped when their metrics.json exists); each is trained in its
own process with one torch thread (the machine is shared).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

OUT = Path("runs/res")
SMALL_RT = ["--model", "minilm", "--task", "rt-sentiment", "--max-train", "1000",
            "--max-test", "500", "--max-len", "64", "--epochs", "1", "--seed", "0"]
MIX = ["--model", "minilm", "--task", "rt+politics", "--max-train", "1000", "--max-test", "500",
       "--max-len", "64", "--epochs", "1", "--seed", "0"]

RUNS: dict[str, list[str]] = {
    # issue 2: SHiRA vs the frozen encoder (and LoRA at the same parameter budget)
    "rt1k-none": [*SMALL_RT, "--method", "none"],
    "rt1k-shira-snip-b8": [*SMALL_RT, "--method", "shira", "--mask", "snip", "--budget-rank", "8"],
    "rt1k-lora-r8": [*SMALL_RT, "--method", "lora", "--rank", "8"],
    "rt1k-shira-snip-b8-lr1e-2": [*SMALL_RT, "--method", "shira", "--mask", "snip",
                                  "--budget-rank", "8", "--lr", "1e-2"],
    "rt1k-shira-snip-b8-lr5e-3": [*SMALL_RT, "--method", "shira", "--mask", "snip",
                                  "--budget-rank", "8", "--lr", "5e-3"],
    "rt1k-shira-random-b8": [*SMALL_RT, "--method", "shira", "--mask", "random",
                             "--budget-rank", "8"],
    "rt1k-shira-snip-b8-2ep": [*SMALL_RT, "--method", "shira", "--mask", "snip",
                               "--budget-rank", "8", "--epochs", "2"],
    "rt1k-lora-r8-2ep": [*SMALL_RT, "--method", "lora", "--rank", "8", "--epochs", "2"],
    "rt1k-none-2ep": [*SMALL_RT, "--method", "none", "--epochs", "2"],
    # issue 3: SoRA r_max=16 + linear scheduler vs LoRA r=16
    "rt1k-lora-r16": [*SMALL_RT, "--method", "lora", "--rank", "16"],
    "rt1k-sora-r16-linear": [*SMALL_RT, "--method", "sora", "--rank", "16", "--xi", "1e-3",
                             "--sora-schedule", "linear", "--sora-xi-max", "1.5e-2"],
    # issue 3: SiRA (E=4, r=2, top-2) vs LoRA r=10: both 7,680 parameters per q/v matrix
    "mix-lora-r10": [*MIX, "--method", "lora", "--rank", "10"],
    "mix-sira-e4r2": [*MIX, "--method", "sira", "--experts", "4", "--rank", "2", "--top-k", "2"],
}


def command(name: str) -> list[str]:
    return ["edgeadapt", "train", *RUNS[name], "--out", str(OUT / name)]


def train(name: str) -> None:
    if (OUT / name / "metrics.json").exists():
        return
    args = [*RUNS[name], "--out", str(OUT / name), "--threads", "1", "--no-progress"]
    code = "from edgeadapt.train.cli import train; train()"
    with open(OUT / f"{name}.log", "w") as log:
        subprocess.run([sys.executable, "-c", code, *args], stdout=log, stderr=subprocess.STDOUT,
                       check=False)


def table() -> str:
    rows = ["| run | test metric | adapter params | train s | command |", "|---|---|---|---|---|"]
    for name in RUNS:
        path = OUT / name / "metrics.json"
        if not path.exists():
            continue
        m = json.loads(path.read_text())
        test = m["test"]
        value = ", ".join(f"{k} {v:.4f}" for k, v in test.items() if k.startswith("accuracy"))
        if "sora" in m:
            value += (f"; live rank {m['sora']['live_rank_total']}/"
                      f"{m['sora']['r_max'] * len(m['sora']['live_ranks'])}, params after "
                      f"pruning {m['sora']['params_after']:,}")
        rows.append(f"| {name} | {value} | {m['trainable_params']:,} | {m['train_s']:.0f} | "
                    f"`{' '.join(command(name))}` |")
    return "\n".join(rows)


if __name__ == "__main__":
    if "--table" in sys.argv:
        print(table())
    else:
        OUT.mkdir(parents=True, exist_ok=True)
        for run_name in sys.argv[1:] or RUNS:
            train(run_name)
