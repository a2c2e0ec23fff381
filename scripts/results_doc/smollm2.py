"""Section 7: SmolLM2-135M, Hamlet perplexity and generative sentiment (issue 7)."""

from __future__ import annotations

from .data import NOT_MEASURED, TRAIN_S, Metrics, acc, notes_link, num, table

SECTION_7 = [("hamlet", "zero-shot", "sm-hamlet-none"),
             ("hamlet", "SHiRA snip, budget r=8", "sm-hamlet-shira-snip-b8"),
             ("hamlet", "LoRA r=8", "sm-hamlet-lora-r8"),
             ("rt-sentiment", "zero-shot", "sm-rt-none"),
             ("rt-sentiment", "SHiRA snip, budget r=8", "sm-rt-shira-snip-b8"),
             ("rt-sentiment", "LoRA r=8", "sm-rt-lora-r8")]


def metric_cell(m: Metrics) -> str:
    """'perplexity 43.3' or 'accuracy 0.818'."""
    key = m["metric"]
    return f"{key} {num(m['test'][key], 1 if key == 'perplexity' else 3)}"


def section_7() -> str:
    """Section 7: SmolLM2-135M Hamlet perplexity and generative sentiment."""
    prefix = ["--model", "smollm2"]
    rows = [([task, label], name) for task, label, name in SECTION_7]
    cols = [("metric", metric_cell), ("adapter params", lambda m: f"{m['trainable_params']:,}"),
            TRAIN_S]
    return f"""## 7. SmolLM2-135M: Hamlet perplexity and generative sentiment (issue 7 item 1)

SmolLM2-135M-Instruct (`--model smollm2`, fp32), adapters on q/v, seed 0, one run each, constant
lr 2e-3, SHiRA-SNIP at LoRA r=8's budget. Hamlet: 128-token blocks, the last 20% of the play held
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
    parts.append("One seed and 30 steps each: section 1 measured several points of seed noise "
                 "for single constant-lr runs.")
    return " ".join(parts)
