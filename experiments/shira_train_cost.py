"""Training cost of SHiRA vs LoRA at equal trainable-parameter budgets (issue 2, item 5).

SHiRA with ``budget_rank=r`` trains K = r * (out + in) values per target matrix, exactly the
parameter count of a LoRA of rank r on the same targets. Both train the same base model on the
same random token batch (causal-LM next-token loss, AdamW):

- step time: forward + backward + optimizer step, both models in this process, measured in
  interleaved rounds (A then B, then B then A, ...) so load drift hits both; median per step.
- peak memory: each method in its own subprocess; Linux's peak-RSS counter (VmHWM) is reset
  via /proc/self/clear_refs after the model is loaded, the adapter attached and one no-grad
  forward has paged in every weight, so the number is the peak of training alone (activations,
  gradients, optimizer state); reported as the rise above the resident size before training.

    .venv/bin/python -m experiments.shira_train_cost --model smollm2 --rank 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

from edgeadapt.timer import time_calls


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _setup(method: str, args: argparse.Namespace):
    from edgeadapt.adapters import LoraConfig, ShiraConfig, attach, trainable_parameters
    from edgeadapt.models import load_model

    lm = load_model(args.model, seed=0)
    config = (ShiraConfig(mask=args.mask, budget_rank=args.rank, targets=args.targets)
              if method == "shira" else LoraConfig(r=args.rank, targets=args.targets))
    attach(lm.model, config)
    params = trainable_parameters(lm.model)
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, lm.vocab_size, (args.batch, args.seq), generator=gen)
    return lm, opt, ids, sum(p.numel() for p in params)


def _step(lm, opt, ids: torch.Tensor) -> None:
    from edgeadapt.models import forward

    opt.zero_grad(set_to_none=True)
    logits = forward(lm, {"input_ids": ids})
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    opt.step()


def measure_memory(method: str, args: argparse.Namespace) -> dict:
    """Peak RSS rise (MiB) over ``args.steps`` training steps, in this (fresh) process."""
    lm, opt, ids, n_params = _setup(method, args)
    from edgeadapt.models import forward

    lm.model.train()
    with torch.no_grad():
        forward(lm, {"input_ids": ids})   # page in every (mmap-loaded) weight before measuring
    rss_before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")   # reset VmHWM to the current RSS
    for _ in range(args.steps):
        _step(lm, opt, ids)
    peak = _status_kib("VmHWM")
    return {"method": method, "params": n_params, "rss_before_mib": rss_before / 1024,
            "peak_mib": peak / 1024, "peak_rise_mib": (peak - rss_before) / 1024}


def measure_time(args: argparse.Namespace) -> dict:
    """Median step seconds per method over interleaved rounds (both models in this process)."""
    runs = {m: _setup(m, args) for m in ("lora", "shira")}
    for lm, opt, ids, _ in runs.values():
        lm.model.train()
        _step(lm, opt, ids)   # warm-up: allocator, optimizer state
    times: dict[str, list[float]] = {m: [] for m in runs}
    for rnd in range(args.rounds):
        for m in (("lora", "shira") if rnd % 2 == 0 else ("shira", "lora")):
            lm, opt, ids, _ = runs[m]
            times[m] += [ms / 1e3 for ms in time_calls(lambda a=(lm, opt, ids): _step(*a),
                                                       repeats=args.steps)]
    return {m: {"params": runs[m][3], "median_s": statistics.median(t),
                "mean_s": statistics.fmean(t), "steps": len(t)} for m, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--targets", default="qv")
    ap.add_argument("--rank", type=int, default=8, help="LoRA r = SHiRA budget_rank")
    ap.add_argument("--mask", default="random")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per method per round")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--memory-child", choices=("lora", "shira"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(measure_memory(args.memory_child, args)))
        return

    child = [sys.executable, __file__] + [a for a in sys.argv[1:]]
    memory = {}
    for m in ("lora", "shira"):
        out = subprocess.run(child + ["--memory-child", m], check=True, capture_output=True,
                             text=True).stdout
        memory[m] = json.loads(out.strip().splitlines()[-1])
    timing = measure_time(args)
    if timing["lora"]["params"] != timing["shira"]["params"]:
        raise SystemExit(f"unequal budgets: {timing}")

    ratio = timing["shira"]["median_s"] / timing["lora"]["median_s"]
    mem_ratio = memory["shira"]["peak_rise_mib"] / memory["lora"]["peak_rise_mib"]
    print(f"model={args.model} targets={args.targets} rank={args.rank} mask={args.mask} "
          f"batch={args.batch} seq={args.seq} threads={args.threads} "
          f"steps={args.steps}x{args.rounds} rounds")
    print(f"trainable parameters: {timing['lora']['params']} (both)")
    print("| method | median step (ms) | mean step (ms) | peak RSS (MiB) | "
          "training peak rise (MiB) |")
    print("|---|---|---|---|---|")
    for m in ("lora", "shira"):
        t, mem = timing[m], memory[m]
        print(f"| {m} | {t['median_s'] * 1e3:.1f} | {t['mean_s'] * 1e3:.1f} | "
              f"{mem['peak_mib']:.0f} | {mem['peak_rise_mib']:.1f} |")
    print(f"SHiRA / LoRA: step time {ratio:.3f}x (target <= 1.1), "
          f"training peak memory {mem_ratio:.3f}x (target <= 1.0)")


if __name__ == "__main__":
    main()
