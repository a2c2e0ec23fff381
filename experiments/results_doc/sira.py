"""Sections 3-3c: SiRA vs LoRA multi-task, SoRA / SiRA with the lr decay (issue 3)."""

from __future__ import annotations

from collections.abc import Sequence

from experiments import results_quality as rq

from .data import (
    ACC,
    ACCURACY,
    NOT_MEASURED,
    TRAIN_S,
    Paired,
    acc,
    binomial_se,
    common_seeds,
    dots,
    mean,
    means_note,
    metrics,
    notes_link,
    num,
    paired,
    pts,
    seed_head,
    seed_row,
    seeds_text,
    series,
    table,
)
from .sora import kept_row, sora_results, sora_text


def section_3() -> str:
    """Section 3: SiRA vs LoRA on rt+politics, seed 0."""
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

{sira_text(paired([(0, lora_n)], [(0, sira_n)]), n_test=n_test_examples([(0, lora_n)]))}

{notes_link("3")}"""


def sira_text(p: Paired | None, halves: str | None = None, n_test: int | None = None) -> str:
    """'What came out' for SiRA vs LoRA (computed); ``halves`` replaces the politics-probe note;
    with ``n_test``, one binomial standard error of LoRA's mean accuracy for scale."""
    if p is None:
        return f"**What came out:** {NOT_MEASURED} (runs missing)."
    verdict = "reproduces" if p.gap >= 0 else "does not reproduce"
    scale = ("" if not n_test else
             f" (one binomial standard error of an accuracy on these {n_test:,} test examples: "
             f"{num(100 * binomial_se(mean(p.a), n_test), 1)} points)")
    return (f"**What came out.** **SiRA >= LoRA {verdict} here**: SiRA minus LoRA "
            f"{p.gaps_text()} points on the mean accuracy ({seeds_text(p.seeds)}), mean "
            f"{pts(p.gap)}{scale}; ahead with {p.wins} of {len(p.seeds)} seeds. "
            f"{halves_text(p) if halves is None else halves}")


def n_test_examples(runs: Sequence[tuple[int, str]]) -> int | None:
    """The test-set size of the first trained run of ``runs``."""
    return next((int(m["test_examples"]) for _, n in runs if (m := metrics(n))), None)


def halves_text(p: Paired) -> str:
    """Per-source halves vs the politics frozen probe (is the politics half learned?)."""
    probe = acc("pol-none-2ep")
    if probe is None:
        return ""
    return (f"(The politics frozen probe of section 4, 2 epochs on 1,000 politics passages, "
            f"scores {num(probe)}: compare the politics halves with it before reading the mean.)")


SECTION_3B = [
    ("LoRA r=16, rt-sentiment", "rt-lora-r16-1ep-lin", ACCURACY),
    ("SoRA r_max=16 + linear xi schedule, rt-sentiment", "rt-sora-r16-linear-1ep-lin", ACCURACY),
    ("LoRA r=10, rt+politics mean", "mix-lora-r10-1ep-lin", ACCURACY),
    ("SiRA E=4 r=2 top-2, rt+politics mean", "mix-sira-e4r2-1ep-lin", ACCURACY),
    ("(rt / politics halves, LoRA)", "mix-lora-r10-1ep-lin", ("accuracy/rt", "accuracy/politics")),
    ("(rt / politics halves, SiRA)", "mix-sira-e4r2-1ep-lin", ("accuracy/rt", "accuracy/politics")),
]


def section_3b() -> str:
    """SoRA and SiRA with the linear lr decay, one row per method, one column per seed."""
    seeds = sorted({s for _, stem, _ in SECTION_3B for s, _ in series(stem)})
    # each comparison's mean column averages the seeds both of its methods have
    groups = {"SoRA": ("rt-lora-r16-1ep-lin", "rt-sora-r16-linear-1ep-lin"),
              "SiRA": ("mix-lora-r10-1ep-lin", "mix-sira-e4r2-1ep-lin")}
    common = {g: common_seeds(stems) for g, stems in groups.items()}
    over = {stem: common[g] for g, stems in groups.items() for stem in stems}
    lines = seed_head(seeds)
    for label, stem, keys in SECTION_3B:
        lines.append(seed_row(label, stem, seeds, keys, over[stem]))
        if stem == "rt-sora-r16-linear-1ep-lin":
            lines.append(kept_row("rt-lora-r16-1ep-lin", stem, seeds, mean_over=over[stem]))
    note = "".join(means_note(seeds, c, f"both {g} and its LoRA", f" of the {g} rows")
                   for g, c in common.items())
    sora = sora_results(series("rt-lora-r16-1ep-lin"), series("rt-sora-r16-linear-1ep-lin"))
    sira = paired(series("mix-lora-r10-1ep-lin"), series("mix-sira-e4r2-1ep-lin"))
    names = ", ".join(f"`{s}-s*`" for s in dict.fromkeys(st for _, st, _ in SECTION_3B))
    return f"""## 3b. SoRA and SiRA again with the linear lr decay, 3 seeds (issue 3)

Same settings as sections 2 and 3 (1,000 / 500, 1 epoch = 63 steps, q/v) plus `--lr-schedule
linear --warmup-steps 6`, one run per seed. Commands: those of sections 2-3 with `--seed N
--lr-schedule linear --warmup-steps 6 --out runs/mp/<name>` (`experiments/results_quality.py`,
names {names}). Halves rows: the accuracy on each source's half of the test set (`rt /
politics`); their mean column is the mean of each half.

{chr(10).join(lines)}{note}

{sora_text(sora)}

{sira_text(sira, n_test=n_test_examples(series('mix-lora-r10-1ep-lin')))}

{notes_link("3b")}"""


MIXS_LORA, MIXS_SIRA = "mixs-lora-r10-1ep-lin", "mixs-sira-e4r2-1ep-lin"
MIXS_HALVES = ("accuracy/rt", "accuracy/subj")
# each half of the rt+subjectivity mix, with the frozen probe of section 4 trained on that task
MIXS_PROBES = {"accuracy/rt": ("rt-sentiment", "rt-none-2ep"),
               "accuracy/subj": ("subjectivity", "subj-none-2ep")}
SECTION_3C = [
    ("LoRA r=10, rt+subjectivity mean", MIXS_LORA, ACCURACY),
    ("SiRA E=4 r=2 top-2, rt+subjectivity mean", MIXS_SIRA, ACCURACY),
    ("(rt / subjectivity halves, LoRA)", MIXS_LORA, MIXS_HALVES),
    ("(rt / subjectivity halves, SiRA)", MIXS_SIRA, MIXS_HALVES),
]


def section_3c() -> str:
    """SiRA vs LoRA on rt+subjectivity, a mix whose second task the adapters can learn."""
    seeds = sorted({s for _, stem, _ in SECTION_3C for s, _ in series(stem)})
    common = common_seeds([MIXS_LORA, MIXS_SIRA])
    lines = seed_head(seeds) + [seed_row(label, stem, seeds, keys, common)
                                for label, stem, keys in SECTION_3C]
    cmds = "\n".join("    " + " ".join(rq.command(f"{stem}-s0")) for stem in (MIXS_LORA, MIXS_SIRA)
                     if f"{stem}-s0" in rq.RUNS)
    p = paired(series(MIXS_LORA), series(MIXS_SIRA))
    return f"""## 3c. SiRA vs LoRA on a learnable multi-task mix, 3 seeds (issue 3)

Sections 3 and 3b mix in a second task, politics, whose adapters did not beat its frozen probe at
1,000 examples (section 4), so their mean accuracy mostly measures rt-sentiment. Here the second
task is **subjectivity**: one sentence of the Rotten Tomatoes corpus, from a critic's review
snippet or from a plot summary (plot summaries cut into sentences of >= 8 words, classes balanced,
split by movie as rt-sentiment). Task `rt+subjectivity`: the two mixed 50/50 (1,000 train / 500
test, 250 per source), one 4-way head, each example scored among its own source's two labels.
Otherwise as 3b: 1 epoch (63 steps), linear lr decay with 6 warmup steps, q/v, LoRA r=10 vs SiRA
E=4, r=2, top-2 (equal trainable parameters, section 3). Seed 0's commands (other seeds: `--seed N`,
names `-sN`):

{cmds}

{chr(10).join(lines)}{means_note(seeds, common)}

{sira_text(p, mixs_halves_text(common), n_test_examples(series(MIXS_LORA)))}"""


def mixs_halves_text(seeds: Sequence[int]) -> str:
    """Each half of rt+subjectivity (mean over ``seeds``) next to that task's frozen probe."""
    parts = []
    for key, (task, probe_run) in MIXS_PROBES.items():
        probe = acc(probe_run)
        halves = [(name, [m["test"][key] for s, n in series(stem) if s in seeds
                          and (m := metrics(n))])
                  for name, stem in (("LoRA", MIXS_LORA), ("SiRA", MIXS_SIRA))]
        if probe is None or not all(v for _, v in halves):
            continue
        scores = " / ".join(num(sum(v) / len(v)) for _, v in halves)
        parts.append(f"{task} {scores} vs its probe's {num(probe)} (`{probe_run}`)")
    if not parts:
        return ""
    return (f"Per half, mean over {seeds_text(seeds)} (LoRA / SiRA) next to section 4's "
            "frozen probe of that task: " + "; ".join(parts) + ". The probes train on 1,000 "
            "examples of the one task for 2 epochs and test on its own 500 examples, the mix's "
            "halves on 500 each for 1 epoch: an indication of whether each half learned more than "
            "a linear head, not a paired comparison.")
