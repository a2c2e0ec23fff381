"""The full run behind ``experiments/results.py``: train missing runs, refresh, render.

``main`` is the CLI (``[--jobs N] [--render-only] [--out PATH]``); see ``experiments/results.py``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from experiments import results_quality as rq
from experiments import results_switch_size as rss

from . import data
from .data import metrics
from .page import render, write_atomic
from .switching import switch_size_rows


def train_missing(jobs: int) -> None:
    """Train every run without metrics.json, ``jobs`` at a time; runs that exclude another run's
    positions (``--exclude-run``) wait for the first wave."""
    data.RUNS_DIR.mkdir(parents=True, exist_ok=True)
    todo = [n for n in rq.RUNS if metrics(n) is None]
    waves = [[n for n in todo if "--exclude-run" not in rq.RUNS[n]],
             [n for n in todo if "--exclude-run" in rq.RUNS[n]]]
    for wave in waves:
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            for name, _ in zip(wave, pool.map(rq.train, wave), strict=True):
                status = "ok" if metrics(name) else f"FAILED, see {rq.OUT / name}.log"
                print(f"trained {name}: {status}", flush=True)


def stale(output: str, runs: set[str]) -> bool:
    """True when ``runs_dir/output`` is missing or older than a metrics.json of ``runs``."""
    out = data.RUNS_DIR / output
    if not out.exists():
        return True
    times = [(data.RUNS_DIR / r / "metrics.json").stat().st_mtime for r in runs if metrics(r)]
    return bool(times) and max(times) > out.stat().st_mtime


def fusion_stale() -> bool:
    """True when fusion.json is missing or older than a metrics.json of a run it fuses."""
    from experiments import results_fusion as rf  # imports torch: only in the full run

    return stale("fusion.json", {run for pair in rf.PAIRS.values() for run in pair.values()})


def quant_stale() -> bool:
    """True when quant.json is missing or older than a metrics.json of a run it evaluates."""
    from experiments import results_quant as rqt  # imports torch: only in the full run

    return stale("quant.json", set(rqt.run_names(rqt.SEEDS)))


def quant_smollm2_stale() -> bool:
    """True when quant-smollm2.json is missing or older than a metrics.json of its runs."""
    from experiments import results_quant as rqt  # imports torch: only in the full run

    return stale("quant-smollm2.json", set(rqt.sm_run_names()))


def refresh() -> None:
    """Fusion and the quantized-base evaluations (when stale) and the switch-size plot."""
    env = {**os.environ, "PYTHONPATH": "."}
    if fusion_stale():
        subprocess.run([sys.executable, "-m", "experiments.results_fusion", "--plot",
                        "docs/fusion.png", "--recheck"], check=True, env=env)
    if quant_stale():
        subprocess.run([sys.executable, "-m", "experiments.results_quant"], check=True, env=env)
    if quant_smollm2_stale():
        subprocess.run([sys.executable, "-m", "experiments.results_quant", "--model", "smollm2",
                        "--resume"], check=True, env=env)
    rows = switch_size_rows()
    if rows:
        rss.plot(rows, "docs/switch_size.png")


DESCRIPTION = ("docs/results.md, generated: trains the missing quality runs, refreshes fusion and "
               "plots, renders.")
ROOT = Path(__file__).resolve().parents[2]  # the repository


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry: train what is missing (unless --render-only), refresh, render."""
    ap = argparse.ArgumentParser(description=DESCRIPTION)
    ap.add_argument("--jobs", type=int, default=2, help="training runs at a time (default 2)")
    ap.add_argument("--render-only", action="store_true", help="only re-render the page")
    ap.add_argument("--out", default="docs/results.md", help="the page to write")
    args = ap.parse_args(argv)
    os.chdir(ROOT)
    if not args.render_only:
        train_missing(args.jobs)
        refresh()
    write_atomic(Path(args.out), render())
    print(f"wrote {args.out}")
