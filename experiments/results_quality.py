"""Quality runs behind docs/results.md: each is one `edgeadapt train` command.

    .venv/bin/python -m experiments.results_quality [run names...]   # trains missing runs

Runs land in runs/mp/<name>/ (skipped when their metrics.json exists; "mp": the mean-pooling
MiniLM classifier; the older pooler-head runs were in runs/res/); each is trained in its own
process with one torch thread (the machine is shared), one after another. To use two cores,
start two copies with disjoint run names. The tables of docs/results.md are rendered from
these runs by experiments/results.py (experiments/results_doc/); fusion:
experiments/results_fusion.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

OUT = Path("runs/mp")


def _base(task: str, epochs: int, train: int = 1000, test: int = 500) -> list[str]:
    return ["--model", "minilm", "--task", task, "--max-train", str(train), "--max-test",
            str(test), "--max-len", "64", "--epochs", str(epochs), "--seed", "0"]


RT2, RT1, POL2, MIX1 = (_base("rt-sentiment", 2), _base("rt-sentiment", 1),
                        _base("politics", 2), _base("rt+politics", 1))
SHIRA = ["--method", "shira", "--mask", "snip", "--budget-rank", "8"]
# section 1 at the larger budget: 2,000 train / 1,000 test, 2 epochs (seed set per run)
RT2K = _base("rt-sentiment", 2, 2000, 1000)[:-2]
LIN = ["--lr-schedule", "linear", "--warmup-steps", "25"]  # 250 steps: 10% warmup, decay to 0


def _rt2k(seed: int, *method: str) -> list[str]:
    return [*RT2K, "--seed", str(seed), *method]


def _shira_all(mask: str, *extra: str) -> list[str]:
    return ["--method", "shira", "--targets", "all", "--mask", mask, "--budget-rank", "8", *extra]

RUNS: dict[str, list[str]] = {
    # issue 2 at 2,000 / 1,000: frozen probe vs SHiRA on all encoder Linear layers (36 matrices,
    # budget = LoRA r=8 on each), LoRA r=8 on the same targets, SHiRA q/v only (issue 7)
    "rt2k-none-s0": _rt2k(0, "--method", "none"),
    "rt2k-none-s1": _rt2k(1, "--method", "none"),
    "rt2k-shira-all-snip-b8-s0": _rt2k(0, *_shira_all("snip")),
    "rt2k-shira-all-snip-b8-s1": _rt2k(1, *_shira_all("snip")),
    "rt2k-lora-all-r8-s0": _rt2k(0, "--method", "lora", "--targets", "all", "--rank", "8"),
    "rt2k-lora-all-r8-s1": _rt2k(1, "--method", "lora", "--targets", "all", "--rank", "8"),
    "rt2k-shira-qv-snip-b8-s0": _rt2k(0, *SHIRA),
    "rt2k-shira-qv-snip-b8-s1": _rt2k(1, *SHIRA),
    # issue 7 item 1: the other mask kinds, seed 0, same setting as SHiRA-all
    "rt2k-shira-all-random-b8-s0": _rt2k(0, *_shira_all("random")),
    "rt2k-shira-all-wm-b8-s0": _rt2k(0, *_shira_all("wm")),
    "rt2k-shira-all-grad-b8-s0": _rt2k(0, *_shira_all("grad")),
    "rt2k-shira-all-struct-b8-s0": _rt2k(0, *_shira_all("struct")),
    "rt2k-shira-all-random-b8-s1": _rt2k(1, *_shira_all("random")),
    # one lever on the margin: SHiRA's adapter lr 5e-3 or 5e-4 instead of 2e-3
    "rt2k-shira-all-snip-b8-lr5e-3-s0": _rt2k(0, *_shira_all("snip", "--lr", "5e-3")),
    "rt2k-shira-all-snip-b8-lr5e-4-s0": _rt2k(0, *_shira_all("snip", "--lr", "5e-4")),
    # issue 2 with a linear lr decay (10% warmup), so the last mini-batches move the score less
    **{f"rt2k-none-lin-s{i}": _rt2k(i, "--method", "none", *LIN) for i in range(3)},
    **{f"rt2k-shira-qv-snip-b8-lin-s{i}": _rt2k(i, *SHIRA, *LIN) for i in range(3)},
    # SHiRA >= LoRA at equal parameters (issue 7), with the decay: LoRA r=8 on the same q/v
    **{f"rt2k-lora-qv-r8-lin-s{i}": _rt2k(i, "--method", "lora", "--rank", "8", *LIN)
       for i in range(3)},
    # issue 2: SHiRA vs the frozen encoder, and LoRA at the same parameter budget (2 epochs)
    "rt-none-2ep": [*RT2, "--method", "none"],
    "rt-shira-snip-b8-2ep": [*RT2, *SHIRA],
    "rt-lora-r8-2ep": [*RT2, "--method", "lora", "--rank", "8"],
    # a second seed for the frozen-vs-SHiRA pair (training subsample, order, mask calibration)
    "rt-none-2ep-s1": [*RT2[:-1], "1", "--method", "none"],
    "rt-shira-snip-b8-2ep-s1": [*RT2[:-1], "1", *SHIRA],
    "rt-lora-r8-2ep-s1": [*RT2[:-1], "1", "--method", "lora", "--rank", "8"],
    # issue 3: SoRA r_max=16 + linear sparsifying scheduler vs LoRA r=16 (1 epoch)
    "rt-lora-r16-1ep": [*RT1, "--method", "lora", "--rank", "16"],
    "rt-sora-r16-linear-1ep": [*RT1, "--method", "sora", "--rank", "16", "--xi", "1e-3",
                               "--sora-schedule", "linear", "--sora-xi-max", "1.5e-2"],
    # issue 3: SiRA (E=4, r=2, top-2) vs LoRA r=10: both 7,680 parameters per q/v matrix
    "mix-lora-r10-1ep": [*MIX1, "--method", "lora", "--rank", "10"],
    "mix-sira-e4r2-1ep": [*MIX1, "--method", "sira", "--experts", "4", "--rank", "2",
                          "--top-k", "2"],
    # issue 7 section 2: the politics halves of the fusion pairs (rt halves: issue-2 runs)
    "pol-shira-snip-b8-2ep": [*POL2, *SHIRA],
    "pol-lora-r8-2ep": [*POL2, "--method", "lora", "--rank", "8"],
    "pol-none-2ep": [*POL2, "--method", "none"],
    # issue 7 section 2: a politics SHiRA whose mask avoids every position of the rt adapter
    "pol-shira-snip-b8-2ep-excl": [*POL2, *SHIRA, "--exclude-run",
                                   str(OUT / "rt-shira-snip-b8-2ep")],
}


# issue 7 item 1 on SmolLM2-135M (q/v, seed 0): Hamlet perplexity (128-token blocks, the last 20%
# held out; 30 steps of batch 8) and Rotten Tomatoes as a generative classifier (label-word
# logits; 30 steps of batch 16); zero-shot baselines; SHiRA at LoRA r=8's budget
_SM_HAM = ["--model", "smollm2", "--task", "hamlet", "--max-len", "128", "--seed", "0"]
_SM_RT = ["--model", "smollm2", "--task", "rt-sentiment", "--max-train", "480", "--max-test",
          "400", "--max-len", "64", "--seed", "0"]
RUNS.update({
    "sm-hamlet-none": [*_SM_HAM, "--method", "none"],
    "sm-hamlet-shira-snip-b8": [*_SM_HAM, "--steps", "30", "--batch-size", "8", *SHIRA],
    "sm-hamlet-lora-r8": [*_SM_HAM, "--steps", "30", "--batch-size", "8", "--method", "lora",
                          "--rank", "8"],
    "sm-rt-none": [*_SM_RT, "--method", "none"],
    "sm-rt-shira-snip-b8": [*_SM_RT, "--steps", "30", "--batch-size", "16", *SHIRA],
    "sm-rt-lora-r8": [*_SM_RT, "--steps", "30", "--batch-size", "16", "--method", "lora",
                      "--rank", "8"],
})
# SoRA (r_max = LoRA's 8; xi doubled from section 2's for 30 steps instead of 63) and SiRA
# (E=4 experts of rank 2, top-2: LoRA r=8's A and B sizes plus a 4 x 576 router per matrix)
_SM_SORA = ["--method", "sora", "--rank", "8", "--xi", "2e-3", "--sora-schedule", "linear",
            "--sora-xi-max", "3e-2"]
_SM_SIRA = ["--method", "sira", "--experts", "4", "--rank", "2", "--top-k", "2"]
for _task, _args, _batch in (("hamlet", _SM_HAM, "8"), ("rt", _SM_RT, "16")):
    RUNS[f"sm-{_task}-sora-r8"] = [*_args, "--steps", "30", "--batch-size", _batch, *_SM_SORA]
    RUNS[f"sm-{_task}-sira-e4r2"] = [*_args, "--steps", "30", "--batch-size", _batch, *_SM_SIRA]


# issue 3 again with the linear lr decay (63 steps: 6 warmup), seeds 0-2
_LIN1 = ["--lr-schedule", "linear", "--warmup-steps", "6"]
_SORA = ["--method", "sora", "--rank", "16", "--xi", "1e-3", "--sora-schedule", "linear",
         "--sora-xi-max", "1.5e-2"]
for _i in range(3):
    _rt1, _mix1 = [*RT1[:-1], str(_i)], [*MIX1[:-1], str(_i)]
    RUNS.update({
        f"rt-lora-r16-1ep-lin-s{_i}": [*_rt1, "--method", "lora", "--rank", "16", *_LIN1],
        f"rt-sora-r16-linear-1ep-lin-s{_i}": [*_rt1, *_SORA, *_LIN1],
        f"mix-lora-r10-1ep-lin-s{_i}": [*_mix1, "--method", "lora", "--rank", "10", *_LIN1],
        f"mix-sira-e4r2-1ep-lin-s{_i}": [*_mix1, "--method", "sira", "--experts", "4", "--rank",
                                         "2", "--top-k", "2", *_LIN1],
    })


# a second task the adapters can learn (politics is at the majority class): subjectivity, for
# fusion (section 4, trained as the rt-*-2ep halves) and for SiRA's multi-task mix (3 seeds)
SUBJ2 = _base("subjectivity", 2)
RUNS.update({
    "subj-none-2ep": [*SUBJ2, "--method", "none"],
    "subj-shira-snip-b8-2ep": [*SUBJ2, *SHIRA],
    "subj-shira-snip-b8-2ep-excl": [*SUBJ2, *SHIRA, "--exclude-run",
                                    str(OUT / "rt-shira-snip-b8-2ep")],
    "subj-lora-r8-2ep": [*SUBJ2, "--method", "lora", "--rank", "8"],
})
for _i in range(3):
    _mixs = [*_base("rt+subjectivity", 1)[:-1], str(_i)]
    RUNS.update({
        f"mixs-lora-r10-1ep-lin-s{_i}": [*_mixs, "--method", "lora", "--rank", "10", *_LIN1],
        f"mixs-sira-e4r2-1ep-lin-s{_i}": [*_mixs, "--method", "sira", "--experts", "4", "--rank",
                                          "2", "--top-k", "2", *_LIN1],
    })

# issue 3's SoRA target at section 1.0's budget (2,000 / 1,000, 250 steps, linear lr decay): at
# 500 test examples one accuracy's binomial standard error is ~1.9 points, too coarse for
# "within 1 point". xi is per step, so with 4x the steps of section 2 it is scaled down ~4x.
for _i in range(3):
    RUNS[f"rt2k-lora-r16-lin-s{_i}"] = _rt2k(_i, "--method", "lora", "--rank", "16", *LIN)
    for _x0, _x1 in (("2.5e-4", "3.75e-3"), ("3.3e-4", "5e-3"), ("5e-4", "7.5e-3")):
        RUNS[f"rt2k-sora-r16-x{_x1}-lin-s{_i}"] = _rt2k(
            _i, "--method", "sora", "--rank", "16", "--xi", _x0, "--sora-schedule", "linear",
            "--sora-xi-max", _x1, *LIN)

# issue 20: quantization-aware SHiRA (section 8): section 1.0's SHiRA trained on the PyTorch
# reference of an int8 / int4 bundle (`--quant`: q/v live, the rest with the backend's activation
# quantization), its values kept on the base's grid; the fp32 runs above are rounded onto the
# same grids after training (experiments/results_quant.py)
for _i in range(3):
    for _p in ("int8", "int4"):
        RUNS[f"rt2k-shira-qv-snip-b8-lin-{_p}qat-s{_i}"] = _rt2k(_i, *SHIRA, *LIN, "--quant", _p)
# and on SmolLM2 (section 8, seed 0): section 7's SHiRA runs trained on the quantized reference
# (the blocks' Linears and the LM head on the grid), beside the fp32 sm-*-shira-snip-b8 rounded
for _task in ("hamlet", "rt"):
    for _p in ("int8", "int4", "int4-affine", "int4-affine-live8"):
        RUNS[f"sm-{_task}-shira-snip-b8-{_p}qat"] = [*RUNS[f"sm-{_task}-shira-snip-b8"],
                                                     "--quant", _p]


# ... and on int4-affine (section 8, "SmolLM2 on int4-affine"): its settings (lr, entries, mask),
# twice the steps beside fp32 SHiRA and LoRA trained as long (the live weights on int8 with the
# rest on int4-affine: sm-hamlet-shira-snip-b8-int4-affine-live8qat above)
_SM_QAT_A = [*RUNS["sm-hamlet-shira-snip-b8"], "--quant", "int4-affine"]
RUNS.update({
    "sm-hamlet-qat-a-lr5e-3": [*_SM_QAT_A, "--lr", "5e-3"],
    "sm-hamlet-qat-a-lr1e-2": [*_SM_QAT_A, "--lr", "1e-2"],
    "sm-hamlet-qat-a-b16": [*_SM_QAT_A, "--budget-rank", "16"],
    "sm-hamlet-qat-a-b32": [*_SM_QAT_A, "--budget-rank", "32"],
    "sm-hamlet-qat-a-grad": [*_SM_QAT_A, "--mask", "grad"],
    "sm-hamlet-qat-a-60": [*_SM_QAT_A, "--steps", "60"],
    "sm-hamlet-shira-snip-b8-60": [*RUNS["sm-hamlet-shira-snip-b8"], "--steps", "60"],
    "sm-hamlet-lora-r8-int4-affine-60": [*RUNS["sm-hamlet-lora-r8"], "--quant", "int4-affine",
                                         "--steps", "60"],
})


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


if __name__ == "__main__":
    if unknown := [n for n in sys.argv[1:] if n not in RUNS]:
        sys.exit(f"usage: python -m experiments.results_quality [RUN ...] (names of RUNS); "
                 f"unknown: {' '.join(unknown)}")
    OUT.mkdir(parents=True, exist_ok=True)
    for run_name in sys.argv[1:] or RUNS:
        train(run_name)
