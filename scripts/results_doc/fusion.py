"""Section 4: multi-adapter fusion and concept loss (issue 7 section 2)."""

from __future__ import annotations

from collections.abc import Sequence

import results_quality as rq

from .data import NOT_MEASURED, NOT_RUN, acc, binomial_se, fusion_results, metrics, notes_link, num

FUSION_PROBES = {"rt-sentiment": "rt-none-2ep", "politics": "pol-none-2ep"}
FUSION_LORA, FUSION_SHIRA = "LoRA r=8", "SHiRA snip (budget = LoRA r=8)"


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


def fusion_compare(task: str) -> tuple[dict, dict, float] | None:
    """(LoRA row, SHiRA row, binomial SE in points) for ``task`` from fusion.json, or None."""
    res = fusion_results()
    by = {r["method"]: r for r in res or []}
    if any(task not in by.get(m, {}).get("tasks", {}) for m in (FUSION_LORA, FUSION_SHIRA)):
        return None
    lora, shira = by[FUSION_LORA]["tasks"][task], by[FUSION_SHIRA]["tasks"][task]
    m = metrics(lora["run"])
    if m is None:
        return None
    return lora, shira, 100 * binomial_se(lora["alone"], int(m["test_examples"]))


def section_4() -> str:
    pol = ["pol-shira-snip-b8-2ep", "pol-lora-r8-2ep", "pol-shira-snip-b8-2ep-excl"]
    cmds = "\n".join("    " + " ".join(rq.command(n)) for n in pol)
    return f"""## 4. Multi-adapter fusion (issue 7 section 2)

Two adapters trained apart (rt-sentiment and politics, each 1,000 / 500, 2 epochs, seed 0), then
fused into one base by adding both deltas (`W = W0 + dW_rt + dW_pol`). Each task is evaluated
with its **own** trained head on its own fixed test set. "alone" is the run's own test accuracy;
`--recheck` also merges each adapter alone into a fresh base (`alone_merged`). Command:
`PYTHONPATH=. .venv/bin/python scripts/results_fusion.py --plot docs/fusion.png --recheck`
(output `runs/mp/fusion.json`). The rt halves are runs of section 1c; the politics halves
(the last one's SNIP mask avoids every position of the rt adapter, `--exclude-run`):

{cmds}

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
        tail += "\n\nShare of the politics SHiRA positions that the rt adapter also trains: "
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
    learned = learned_tasks(res)
    unlearned = [t for t in fusion_tasks(res) if t not in learned]
    parts = ["**What came out.**"]
    for task in learned:
        cmp = fusion_compare(task)
        if cmp is None:
            continue
        lora, shira, se = cmp
        diff = lora["loss_points"] - shira["loss_points"]
        direction = "matches" if diff > 0 else "does not match"
        noise = "within" if abs(diff) < se else "outside"
        parts.append(f"On {task} the direction {direction} the paper: fusing costs LoRA "
                     f"{num(lora['loss_relative_pct'], 1)}% and SHiRA "
                     f"{num(shira['loss_relative_pct'], 1)}%"
                     f" (relative; paper LoRA 11.1%, SHiRA 3.6-4.4%); the difference, "
                     f"{num(diff, 1)} points, is {noise} one binomial standard error ({num(se, 1)} "
                     f"points).")
    for task in unlearned:
        probe = acc(FUSION_PROBES.get(task, ""))
        alones = ", ".join(f"{num(r['tasks'][task]['alone'])}" for r in res if task in r["tasks"])
        ref = "no frozen probe" if probe is None else f"the frozen probe's {num(probe)}"
        parts.append(f"**{task} cannot measure concept loss**: its adapters alone ({alones}) do "
                     f"not beat {ref}.")
    return " ".join(parts)
