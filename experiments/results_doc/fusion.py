"""Section 4: multi-adapter fusion and concept loss (issue 7 section 2)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from experiments import results_quality as rq

from .data import (
    NOT_MEASURED,
    NOT_RUN,
    acc,
    binomial_se,
    fusion_results,
    metrics,
    notes_link,
    num,
    run_arg,
)

FUSION_PROBES = {"rt-sentiment": "rt-none-2ep", "politics": "pol-none-2ep",
                 "subjectivity": "subj-none-2ep"}
# (second task, LoRA method, SHiRA method, SHiRA with non-overlapping masks), as the methods are
# named in experiments/results_fusion.py PAIRS: rt-sentiment's adapter fused with the second task's
FUSION_PAIRINGS = [
    ("politics", "LoRA r=8", "SHiRA snip (budget = LoRA r=8)",
     "SHiRA snip, non-overlapping masks"),
    ("subjectivity", "LoRA r=8, rt + subjectivity",
     "SHiRA snip (budget = LoRA r=8), rt + subjectivity",
     "SHiRA snip, non-overlapping masks, rt + subjectivity"),
]
FUSION_LORA, FUSION_SHIRA = FUSION_PAIRINGS[0][1:3]
SECOND_RUNS = ["pol-shira-snip-b8-2ep", "pol-lora-r8-2ep", "pol-shira-snip-b8-2ep-excl",
               "subj-shira-snip-b8-2ep", "subj-lora-r8-2ep", "subj-shira-snip-b8-2ep-excl"]


def fusion_tasks(results: Sequence[dict]) -> list[str]:
    """Every task of fusion.json, in first-seen order."""
    return list(dict.fromkeys(task for r in results for task in r["tasks"]))


def learned_tasks(results: Sequence[dict]) -> list[str]:
    """Tasks where every fused method's adapter, alone, beats that task's frozen probe."""
    tasks = []
    for task in fusion_tasks(results):
        probe = acc(FUSION_PROBES.get(task, ""))
        alones = [r["tasks"][task]["alone"] for r in results if task in r["tasks"]]
        if probe is not None and all(a > probe for a in alones):
            tasks.append(task)
    return tasks


@dataclass
class ConceptLoss:
    """LoRA vs SHiRA fusion loss on one learned task of one pairing (fusion.json rows)."""

    task: str
    other: str  # the task of the adapter it was fused with
    lora: dict
    shira: dict
    excl: dict | None  # SHiRA with non-overlapping masks, when fused
    se: float  # one binomial standard error of LoRA's accuracy alone, in points

    @property
    def label(self) -> str:
        """'rt-sentiment (fused with politics)'."""
        return f"{self.task} (fused with {self.other})"

    @property
    def diff(self) -> float:
        """LoRA's loss minus SHiRA's, in points (> 0: LoRA loses more, as the paper says)."""
        return self.lora["loss_points"] - self.shira["loss_points"]

    @property
    def verdict(self) -> str:
        """'yes' (LoRA loses more by at least one SE), 'direction only', or 'no'."""
        return ("no" if self.diff <= 0 else
                "direction only (within noise)" if self.diff < self.se else "yes")


def concept_losses() -> list[ConceptLoss]:
    """One entry per learned task of every pairing whose LoRA and SHiRA rows are fused."""
    res = fusion_results() or []
    by = {r["method"]: r for r in res}
    learned = learned_tasks(res)
    out = []
    for _, lora_m, shira_m, excl_m in FUSION_PAIRINGS:
        if lora_m not in by or shira_m not in by:
            continue
        lora, shira = by[lora_m]["tasks"], by[shira_m]["tasks"]
        excl = by.get(excl_m, {}).get("tasks", {})
        for task in [t for t in lora if t in shira and t in learned]:
            m = metrics(lora[task]["run"])
            if m is None:
                continue
            other = next((t for t in shira if t != task), "?")
            se = 100 * binomial_se(lora[task]["alone"], int(m["test_examples"]))
            out.append(ConceptLoss(task, other, lora[task], shira[task], excl.get(task), se))
    return out


def fusion_verdict(losses: Sequence[ConceptLoss]) -> str:
    """The claim's verdict over every learned task: one word when they agree, else each."""
    verdicts = {c.verdict for c in losses}
    if not verdicts:
        return NOT_MEASURED
    if len(verdicts) == 1:
        return verdicts.pop()
    return "mixed: " + "; ".join(f"{c.label} {c.verdict}" for c in losses)


def rel(row: dict) -> str:
    """A fusion row's change relative to 'alone', signed ('-1.8%' a loss, '+1.5%' a gain)."""
    return f"{num(-row['loss_relative_pct'], 1, True)}%"


def section_4() -> str:
    """Fusion of two adapters trained apart: table, plot, computed concept-loss verdicts."""
    runs = [*SECOND_RUNS, *(FUSION_PROBES[k] for k in ("politics", "subjectivity"))]
    cmds = "\n".join("    " + " ".join(rq.command(n)) for n in runs if n in rq.RUNS)
    return f"""## 4. Multi-adapter fusion (issue 7 section 2)

Two adapters trained apart, each on its own task (1,000 / 500, 2 epochs, seed 0), then fused into
one base by adding both deltas (`W = W0 + dW_rt + dW_2`): the rt-sentiment adapter with a politics
one (the first three methods below) and with a subjectivity one (the last three, "rt +
subjectivity"; subjectivity is section 3c's review-vs-plot task). Each task is evaluated with its
**own** trained head on its own fixed test set. "alone" is the run's own test accuracy;
`--recheck` also merges each adapter alone into a fresh base (`alone_merged`). Command:
`.venv/bin/python -m experiments.results_fusion --plot docs/fusion.png --recheck`
(output `runs/mp/fusion.json`). The rt halves are runs of section 1c; the second halves (the
`-excl` runs' SNIP masks avoid every position of the rt adapter, `--exclude-run`) and the frozen
probes of politics and subjectivity:

{cmds}

Concept loss is only measured on a task the adapters learned: one where every adapter of that
task, alone, beats the task's frozen probe (`{"`, `".join(FUSION_PROBES.values())}`).

{fusion_table()}

![fusion](fusion.png)

{fusion_text()}

{notes_link("4")}"""


def fusion_table() -> str:
    """The fusion rows of fusion.json, with mask overlaps."""
    res = fusion_results()
    if not res:
        return f"Fusion: {NOT_RUN} (`runs/mp/fusion.json` missing)."
    lines = ["| method | task | alone | fused | loss (points) | loss (relative) |",
             "|---|---|---|---|---|---|"]
    for r in res:
        for task, t in r["tasks"].items():
            gain = " (gain)" if num(t["loss_points"], 1).startswith("-") else ""
            lines.append(f"| {r['method']} | {task} | {num(t['alone'])} | {num(t['fused'])} | "
                         f"{num(t['loss_points'], 1)}{gain} | "
                         f"{num(t['loss_relative_pct'], 1)}%{gain} |")
    overlaps = [f"{r['method']}: {num(100 * r['mask_overlap'], 1)}%" for r in res
                if r.get("mask_overlap") is not None]
    merged = [t.get("alone_merged") == t["alone"] for r in res for t in r["tasks"].values()
              if "alone_merged" in t]
    tail = ""
    if overlaps:
        tail += "\n\nShare of the rt adapter's SHiRA positions that the other adapter also trains: "
        tail += "; ".join(overlaps) + "."
    if merged:
        tail += (f" The recheck (each adapter merged alone) reproduced the run's own accuracy in "
                 f"{sum(merged)} of {len(merged)} cases.")
    return "\n".join(lines) + tail


def fusion_text() -> str:
    """'What came out' of section 4 (computed)."""
    res = fusion_results()
    if not res:
        return f"**What came out:** {NOT_MEASURED}."
    methods = {r["method"] for r in res}
    parts = ["**What came out.**"]
    for c in concept_losses():
        direction = "matches" if c.diff > 0 else "does not match"
        noise = "within" if abs(c.diff) < c.se else "outside"
        excl = "" if c.excl is None else f", SHiRA with non-overlapping masks {rel(c.excl)}"
        parts.append(f"On {c.label} the direction {direction} the paper: fused vs alone, LoRA "
                     f"{rel(c.lora)} and SHiRA {rel(c.shira)}{excl} (paper: LoRA -11.1%, SHiRA "
                     f"-3.6 to -4.4%); LoRA minus SHiRA loss, {num(c.diff, 1)} points, is {noise} "
                     f"one binomial standard error ({num(c.se, 1)} points).")
    learned = learned_tasks(res)
    for task in [t for t in fusion_tasks(res) if t not in learned]:
        probe = acc(FUSION_PROBES.get(task, ""))
        alones = ", ".join(f"{num(r['tasks'][task]['alone'])}" for r in res if task in r["tasks"])
        ref = "no frozen probe" if probe is None else f"the frozen probe's {num(probe)}"
        parts.append(f"**{task} cannot measure concept loss**: its adapters alone ({alones}) do "
                     f"not beat {ref}.")
    for other, *names in FUSION_PAIRINGS:
        if not any(n in methods for n in names):
            parts.append(f"The pairs with {other} are not in `runs/mp/fusion.json` yet: "
                         f"{pending_text(other)}.")
    return " ".join(parts)


def pending_text(task: str) -> str:
    """Why a pairing is missing from fusion.json: its untrained runs, or a stale fusion.json."""
    runs = [n for n in SECOND_RUNS if run_arg(n, "--task") == task]
    missing = [n for n in runs if metrics(n) is None]
    if missing:
        return f"{', '.join(f'`{n}`' for n in missing)} {NOT_RUN}"
    return "its runs are trained, re-run the fusion command above"
