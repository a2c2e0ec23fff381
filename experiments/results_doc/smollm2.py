"""Section 7: SmolLM2-135M, Hamlet perplexity and generative sentiment (issue 7)."""

from __future__ import annotations

from .data import NOT_MEASURED, TRAIN_S, Metrics, acc, metrics, notes_link, num, table

SECTION_7 = [("hamlet", "zero-shot", "sm-hamlet-none"),
             ("hamlet", "SHiRA snip, budget r=8", "sm-hamlet-shira-snip-b8"),
             ("hamlet", "LoRA r=8", "sm-hamlet-lora-r8"),
             ("hamlet", "SoRA r_max=8, xi 2e-3 -> 3e-2", "sm-hamlet-sora-r8"),
             ("hamlet", "SiRA E=4 r=2 top-2", "sm-hamlet-sira-e4r2"),
             ("rt-sentiment", "zero-shot", "sm-rt-none"),
             ("rt-sentiment", "SHiRA snip, budget r=8", "sm-rt-shira-snip-b8"),
             ("rt-sentiment", "LoRA r=8", "sm-rt-lora-r8"),
             ("rt-sentiment", "SoRA r_max=8, xi 2e-3 -> 3e-2", "sm-rt-sora-r8"),
             ("rt-sentiment", "SiRA E=4 r=2 top-2", "sm-rt-sira-e4r2")]


def metric_cell(m: Metrics) -> str:
    """'perplexity 43.3' or 'accuracy 0.818'."""
    key = m["metric"]
    return f"{key} {num(m['test'][key], 1 if key == 'perplexity' else 3)}"


def pruned_cell(m: Metrics) -> str:
    """SoRA: the parameters left after pruning dead ranks; other methods: '-'."""
    return f"{m['sora']['params_after']:,}" if "sora" in m else "-"


def section_7() -> str:
    """Section 7: SmolLM2-135M Hamlet perplexity and generative sentiment."""
    prefix = ["--model", "smollm2"]
    rows = [([task, label], name) for task, label, name in SECTION_7]
    cols = [("metric", metric_cell), ("adapter params", lambda m: f"{m['trainable_params']:,}"),
            ("params after pruning", pruned_cell), TRAIN_S]
    return f"""## 7. SmolLM2-135M: Hamlet perplexity and generative sentiment (issue 7 item 1)

SmolLM2-135M-Instruct (`--model smollm2`, fp32), adapters on q/v, seed 0, one run each, constant
lr 2e-3, SHiRA-SNIP at LoRA r=8's budget. SoRA has LoRA r=8's rank as its r_max and section 2's
xi schedule doubled (30 steps instead of 63); SiRA's 4 experts of rank 2 have LoRA r=8's A and B
sizes plus a 4 x 576 router per matrix. Hamlet: 128-token blocks, the last 20% of the play held
out, 30 steps of batch 8; Rotten Tomatoes as a generative classifier (the logits of the label
words, 480 training / 400 test examples), 30 steps of batch 16. `...` = `edgeadapt train
{' '.join(prefix)}`.

{table(["task", "run"], rows, cols, prefix)}

{section_7_text()}

{notes_link("7")}"""


def section_7_text() -> str:
    """'What came out' of section 7 (computed)."""
    parts = ["**What came out.**"]
    for task, key, nd in (("hamlet", "perplexity", 1), ("rt", "accuracy", 3)):
        zero, shira, lora = (acc(f"sm-{task}-{r}", key) for r in
                             ("none", "shira-snip-b8", "lora-r8"))
        if None in (zero, shira, lora):
            parts.append(f"{task}: {NOT_MEASURED}.")
            continue
        better = (lambda a, b: a <= b) if key == "perplexity" else (lambda a, b: a >= b)
        lead = "SHiRA at least matches LoRA" if better(shira, lora) else "LoRA is ahead of SHiRA"
        parts.append(f"{task} {key}: zero-shot {num(zero, nd)} -> SHiRA {num(shira, nd)}, LoRA "
                     f"{num(lora, nd)}; {lead} at equal parameters.")
    parts += [others_text(task, key, nd) for task, key, nd in (("hamlet", "perplexity", 1),
                                                                ("rt", "accuracy", 3))]
    parts.append("One seed and 30 steps each: section 1 measured several points of seed noise "
                 "for single constant-lr runs.")
    return " ".join(p for p in parts if p)


def others_text(task: str, key: str, nd: int) -> str:
    """SoRA (with its share of LoRA r=8's parameters after pruning) and SiRA against LoRA."""
    lora = metrics(f"sm-{task}-lora-r8")
    sora, sira = metrics(f"sm-{task}-sora-r8"), metrics(f"sm-{task}-sira-e4r2")
    if lora is None or (sora is None and sira is None):
        return ""
    out = []
    if sora is not None:
        kept = sora["sora"]["params_after"] / lora["trainable_params"]
        out.append(f"SoRA {num(sora['test'][key], nd)} keeping {num(100 * kept, 1)}% of LoRA "
                   "r=8's parameters")
    if sira is not None:
        out.append(f"SiRA {num(sira['test'][key], nd)}")
    return f"{task} {key}, against LoRA's {num(lora['test'][key], nd)}: " + "; ".join(out) + "."
