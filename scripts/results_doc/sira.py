"""Sections 3 and 3b: SiRA vs LoRA multi-task, and SoRA / SiRA with the lr decay (issue 3)."""

from __future__ import annotations

from collections.abc import Sequence

import results_quality as rq

from .data import (
    ACC,
    NOT_MEASURED,
    NOT_RUN,
    TRAIN_S,
    Paired,
    acc,
    dots,
    mean,
    metrics,
    notes_link,
    num,
    paired,
    pts,
    seeds_text,
    series,
    table,
)
from .sora import kept_row, sora_results, sora_text


def section_3() -> str:
    lora_n, sira_n = "mix-lora-r10-1ep", "mix-sira-e4r2-1ep"
    cols = [("params", lambda m: f"{m['trainable_params']:,}"), ACC,
            ("rt", lambda m: f"{num(m['test']['accuracy/rt'])}"),
            ("politics", lambda m: f"{num(m['test']['accuracy/politics'])}"), TRAIN_S]
    cols[1] = ("mean accuracy", ACC[1])
    rows = [(["LoRA r=10"], lora_n),
            (["SiRA E=4, r=2, top-2, capacity 1.25, expert dropout 0.1, aux 0.01"], sira_n)]
    per = [f"{m['trainable_params'] // m['targets']:,}" for n in (lora_n, sira_n)
           if (m := metrics(n))]
    per_text = (f"Per q/v matrix they train {' and '.join(per)} parameters (LoRA r x (in + out); "
                f"SiRA E x r x (in + out) + an E x in router)." if per else "")
    return f"""## 3. SiRA vs LoRA at equal trainable parameters, multi-task (issue 3)

Task `rt+politics`: Rotten Tomatoes and convention-speech passages mixed 50/50 (1,000 train /
500 test, 250 per source), one 4-way head, each example scored among its own source's two
labels. 1 epoch, seed 0; {dots(rq.MIX1)}.

{table(["run"], rows, cols, rq.MIX1)}

{per_text}

{sira_text(paired([(0, lora_n)], [(0, sira_n)]))}

{notes_link("3")}"""


def sira_text(p: Paired | None) -> str:
    """'What came out' for SiRA vs LoRA (computed)."""
    if p is None:
        return f"**What came out:** {NOT_MEASURED} (runs missing)."
    verdict = "reproduces" if p.gap >= 0 else "does not reproduce"
    return (f"**What came out.** **SiRA >= LoRA {verdict} here**: SiRA minus LoRA "
            f"{p.gaps_text()} points on the mean accuracy ({seeds_text(p.seeds)}), mean "
            f"{pts(p.gap)}; ahead with {p.wins} of {len(p.seeds)} seeds. "
            f"{halves_text(p)}")


def halves_text(p: Paired) -> str:
    """Per-source halves vs the politics frozen probe (is the politics half learned?)."""
    probe = acc("pol-none-2ep")
    if probe is None:
        return ""
    return (f"(The politics frozen probe of section 4, 2 epochs on 1,000 politics passages, "
            f"scores {num(probe)}: compare the politics halves with it before reading the mean.)")


SECTION_3B = [
    ("LoRA r=16, rt-sentiment", "rt-lora-r16-1ep-lin", "accuracy"),
    ("SoRA r_max=16 + linear xi schedule, rt-sentiment", "rt-sora-r16-linear-1ep-lin", "accuracy"),
    ("LoRA r=10, rt+politics mean", "mix-lora-r10-1ep-lin", "accuracy"),
    ("SiRA E=4 r=2 top-2, rt+politics mean", "mix-sira-e4r2-1ep-lin", "accuracy"),
    ("(rt / politics halves, LoRA)", "mix-lora-r10-1ep-lin", "halves"),
    ("(rt / politics halves, SiRA)", "mix-sira-e4r2-1ep-lin", "halves"),
]


def seed_row(label: str, stem: str, what: str, seeds: Sequence[int]) -> str:
    """One row of a seeds-as-columns table (accuracy with a mean, or the rt / politics halves)."""
    runs = dict(series(stem))
    cells, vals = [], []
    for s in seeds:
        m = metrics(runs.get(s, ""))
        if m is None:
            cells.append(NOT_RUN)
        elif what == "halves":
            cells.append(f"{num(m['test']['accuracy/rt'])} / {num(m['test']['accuracy/politics'])}")
        else:
            vals.append(m["test"]["accuracy"])
            cells.append(f"{num(vals[-1])}")
    tail = f"{num(mean(vals))}" if vals else ""
    return "| " + " | ".join([label, *cells, tail]) + " |"


def section_3b() -> str:
    seeds = sorted({s for _, stem, _ in SECTION_3B for s, _ in series(stem)})
    head = ["| run", *(f"seed {s}" for s in seeds), "mean |"]
    lines = [" | ".join(head), "|" + "---|" * (len(seeds) + 2)]
    for label, stem, what in SECTION_3B:
        lines.append(seed_row(label, stem, what, seeds))
        if stem == "rt-sora-r16-linear-1ep-lin":
            lines.append(kept_row("rt-lora-r16-1ep-lin", stem, seeds))
    sora = sora_results(series("rt-lora-r16-1ep-lin"), series("rt-sora-r16-linear-1ep-lin"))
    sira = paired(series("mix-lora-r10-1ep-lin"), series("mix-sira-e4r2-1ep-lin"))
    names = ", ".join(f"`{s}-s*`" for s in dict.fromkeys(st for _, st, _ in SECTION_3B))
    return f"""## 3b. SoRA and SiRA again with the linear lr decay, 3 seeds (issue 3)

Same settings as sections 2 and 3 (1,000 / 500, 1 epoch = 63 steps, q/v) plus `--lr-schedule
linear --warmup-steps 6`, one run per seed. Commands: those of sections 2-3 with `--seed N
--lr-schedule linear --warmup-steps 6 --out runs/mp/<name>` (`scripts/results_quality.py`,
names {names}).

{chr(10).join(lines)}

{sora_text(sora)}

{sira_text(sira)}

{notes_link("3b")}"""
