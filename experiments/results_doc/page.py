"""The page: header, static sections, the ``SECTIONS`` order, wrapping and the atomic write."""

from __future__ import annotations

import datetime
import textwrap
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from edgeadapt.bench.host import cpu_name
from edgeadapt.format.container import atomic_write_bytes
from experiments import results_quality as rq

from . import claims, data, fusion, quantized, shira, sira, smollm2, sora, switching
from .data import NOTES, metrics, num

COMMAND = ".venv/bin/python -m experiments.results"


def hardware() -> str:
    """CPU model, visible cores (as the bench JSONs name the device) and torch version of the
    machine rendering the page."""
    try:
        torch = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch = "not installed"
    return f"{cpu_name()}, torch {torch}"


def wall_estimate() -> str:
    """How long a full run takes, from the recorded wall_s of every defined run."""
    walls = [m["wall_s"] for n in rq.RUNS if (m := metrics(n)) and "wall_s" in m]
    missing = sum(metrics(n) is None for n in rq.RUNS)
    if not walls:
        return "no run has been trained yet, so no estimate"
    total = sum(walls)
    return (f"the {len(walls)} trained runs took {num(total / 3600, 1)} h of wall time in all "
            f"(their `wall_s`), i.e. about {num(total / 2 / 3600, 1)} h at `--jobs 2`"
            f" plus a few minutes for the fusion script; {missing} defined run(s) not trained yet")


SUMMARY = [  # method, accuracy MiniLM · SmolLM2, size, switch, forward
    ("frozen model (MiniLM: + trained head)", "0.736 · 0.760", "head only", "-", "1"),
    ("SHiRA (SNIP mask)", "0.784 · 0.818",
     "73,728 values, 3-3.4 B each in `.eadp` (fp16; docs/format.md)",
     "2.37 / 2.28 ms in place, exact undo", "0.97-1.01 (fused)"),
    ("LoRA r=8", "0.792 · 0.830", "73,728 values (A, B), 2 B each (fp16)",
     "fuse with exact restore: 85.7 / 40.0 ms", "0.97-1.01 fused; 1.01-1.02 unfused"),
    ("SoRA (r_max 16, pruned)",
     "within 1 point of LoRA r=16 with 53.5-65.5% of its parameters (2b) · 0.830",
     "LoRA's, pruned", "as LoRA (fused after pruning)", "as LoRA"),
    ("SiRA (4 experts, top-2)", "0.3-2.6 points below LoRA on task mixes (3-3c) · 0.838",
     "LoRA's + a router", "a graph variant", "1.10 at 1 token, 1.04 at 64 (unfused)"),
]


def summary_table() -> str:
    """The summary's method table."""
    head = ["method", "accuracy, MiniLM · SmolLM2", "size", "switch", "forward"]
    lines = ["| " + " | ".join(r) + " |" for r in [head, *SUMMARY]]
    return "\n".join([lines[0], "|" + "---|" * len(head), *lines[1:]])


def section_summary() -> str:
    """Title and the hand-written two-minute summary (its numbers are those of the sections
    named; update it by hand when they move)."""
    return f"""# Results: adapter quality on real models

## In two minutes

What each method gave here. Accuracy: MiniLM-L6 on Rotten Tomatoes sentiment (section 1.0: 2,000
training examples, q/v, mean of 3 seeds) and SmolLM2-135M as a generative sentiment classifier
(section 7, one seed). Size: the adapter at LoRA r=8's parameter budget on MiniLM's q/v. Switch
and forward: SmolLM2-135M with q/v live, ONNX Runtime / ExecuTorch on one CPU thread (section 5,
`docs/bench.md`); "forward" is the forward time with the adapter active over the base model's.

{summary_table()}

- **SHiRA's gain is the switch, not accuracy.** Swapping one SHiRA adapter for another edits 1% of
  the live weights in place in about 2.3 ms on a 135M-parameter model, 18-36x faster than fusing
  LoRA with an exact restore and 310-560x faster than reloading the model, and costs nothing at
  inference. Its accuracy is LoRA's at equal parameters, not above: the paper's +2.7 points does
  not reproduce (-0.7 points on MiniLM, -1.3 on SmolLM2); against the frozen model it is clearly
  ahead (+4.9 points, every seed).
- **SoRA** prunes LoRA r=16 to 53.5-65.5% of its parameters within a point of its accuracy
  (means over 3 seeds) on two of three schedules (section 2b); **SiRA** did not beat LoRA at
  equal parameters on any mix (sections 3-3c).
- **Fusing two adapters** (adding both deltas) costs the rt-sentiment task 0.5% with SHiRA and
  1.8% with LoRA beside a politics adapter, but 4.9% and 1.8% beside a subjectivity one, which
  itself loses 35% / 23% (section 4): the paper's "SHiRA loses less than LoRA when fused" holds
  in one of three cases, and there within noise.
- Every claim with its verdict: the claims summary below; the SmolLM2 backend targets all pass
  (section 5)."""


def section_header() -> str:
    """How the page is made: the command, the machine, the model and the default setting."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""## How this page is made

**Generated page: do not edit by hand** (except the summary above, written in
`experiments/results_doc/page.py`). Every other number and verdict is computed at render
time from the runs' `runs/mp/<name>/metrics.json`, `runs/mp/fusion.json` and the committed
`docs/bench/*.json`. The one command that makes it (also `make results`; `make results
RESULTS_ARGS=--render-only` only re-renders):

    {COMMAND} [--jobs N] [--render-only] [--out docs/results.md]

Without `--render-only` it first trains every missing run of `experiments/results_quality.py`
(`--jobs` at a time, default 2, one torch thread each), re-runs `python -m
experiments.results_fusion --plot docs/fusion.png --recheck` when its output is missing or older
than its runs, and re-draws `docs/switch_size.png`; `--render-only` only re-renders (seconds). It
does not run `edgeadapt bench` (section 5 says how each bench JSON was made). Full run from
scratch: {wall_estimate()}.

The hand-written lab notebook with the exploratory analysis of these runs (learning-rate levers,
mask-row concentration, the pooler-head findings, majority-class rates) is
[`experiments/results_notes.md`]({NOTES}), frozen on 2026-11-23.

**Rendered** {now} on {hardware()}. The runs were trained on the shared 2-core development
machine (CPU only), one torch thread per run, usually two runs at a time with other jobs
competing: wall times are contention-bound, compare them only with each other. "train s" is the
training loop alone, "wall s" includes loading, tokenising and evaluating.

**Model.** MiniLM rows use `MeanPoolClassifier` (`edgeadapt/models/classifier.py`): the encoder's
last hidden states mean-pooled over the attention mask into a bias-free linear head.
**Default setting** (sections 1c-4, unless a section says otherwise; 1.0-1b and 2b say theirs):
MiniLM-L6, adapter targets `qv` (query and value of the 6 layers), AdamW without weight decay,
adapter lr 2e-3, head lr 1e-2 (the head always trains), constant learning rate unless a command
says `--lr-schedule linear`, batch 16, max_len 64, 1,000 training / 500 test examples. Test sets
are fixed (the same examples for every run and seed; `--seed` picks the training subsample, its
order, adapter init and the SNIP calibration batch).
`edgeadapt train ...` below is the installed console script; the
scripts call the same `edgeadapt.train.cli.train` with `--threads 1 --no-progress` added."""


def section_6() -> str:
    """Pointer to the pooler-head findings kept in the lab notebook."""
    return f"""## 6. Findings kept from the pooler-head version

Moved verbatim to [the lab notebook]({NOTES}#6) (measured with the older
`BertForSequenceClassification` head; not regenerated)."""


def section_not_done() -> str:
    """What the page does not answer yet; the pending items list their missing runs or files."""
    decay = [n for _, n in data.series(shira.LORA_1_0)]
    items = [
        "Sections 1a-1b (all targets, mask kinds, LoRA-all) ran with a constant learning rate, "
        "whose last-step noise between seeds is large (1a); they were not re-run with the linear "
        "decay that section 1.0 uses."
        + ("" if decay and all(metrics(n) for n in decay) else
           " SHiRA vs LoRA at equal parameters with the decay (the paper's SHiRA >= LoRA, "
           "section 1.0's LoRA rows) is not measured on every seed yet."),
        "SoRA and SiRA: multi-seed only on MiniLM q/v (SoRA at 1,000 / 500 and, in 2b, 2,000 / "
        "1,000; SiRA at 1,000 / 500, 1 epoch); on SmolLM2 one seed each (section 7), and "
        "never on all targets. SiRA's multi-task claim is tested on MiniLM only (section 7's "
        "SmolLM2 runs are single-task).",
        "SNIP / grad masks scored after a short head-only warm-up (so that the calibration "
        "gradient does not come from a random head): the trainer has no option for it.",
        "Fusion (section 4): one seed per pair, MiniLM only.",
        "SmolLM2 (section 7): one seed, 30 steps.",
        ("Quantized bases (section 8): on the PyTorch reference of the bundles; SmolLM2 one "
         "seed (section 7's runs); the backends' own accuracy on quantized bundles is not "
         "measured." if (data.RUNS_DIR / "quant-smollm2.json").exists() else
         "Quantized bases (section 8): MiniLM only, on the PyTorch reference of the bundles; "
         "issue 20's SmolLM2 targets (sentiment, Hamlet perplexity within 2%) and the "
         "backends' own accuracy on quantized bundles are not measured."),
    ]
    for sec, stems in (("2b", (sora.LORA_2B, *sora.SORA_2B)),
                       ("3c", (sira.MIXS_LORA, sira.MIXS_SIRA))):
        defined = [n for stem in stems for _, n in data.series(stem)]
        if missing := [n for n in defined if metrics(n) is None]:
            items.append(f"Section {sec}: {len(missing)} of its {len(defined)} runs not trained "
                         f"yet.")
    fused = {r["method"] for r in data.fusion_results() or []}
    items += [f"Section 4: the pairs with {other} are not in `runs/mp/fusion.json` yet."
              for other, *names in fusion.FUSION_PAIRINGS if not fused & set(names)]
    return "## Not done yet\n\n" + "\n".join(f"- {it}" for it in items)


# The page, in order. Headings (and so their anchors) are those of the hand-written page this
# replaced; keep them stable. To add a section, write a function returning its markdown in the
# module of its part of the page (tables via `data.table`, seed series via `data.series`, verdicts
# via `data.paired` / `sora.sora_results`) and list it here; a claims row goes in `claims.claims`.
SECTIONS: list[Callable[[], str]] = [
    section_summary, section_header, claims.section_claims, shira.section_1, shira.section_1_0,
    shira.section_1a, shira.section_1b, shira.section_1c, sora.section_2, sora.section_2b,
    sira.section_3, sira.section_3b, sira.section_3c, fusion.section_4, switching.section_5,
    section_6, smollm2.section_7, quantized.section_8, section_not_done,
]


def _fill(text: str, indent: str = "") -> str:
    """``textwrap.fill`` at 100 columns, never breaking words or at hyphens."""
    return textwrap.fill(text, 100, subsequent_indent=indent, break_long_words=False,
                         break_on_hyphens=False)


def wrap(md: str) -> str:
    """Re-flow prose paragraphs and list items to 100 columns; blocks with a table, heading,
    image or indented code line are left as they are."""
    blocks = []
    for block in md.split("\n\n"):
        lines = block.split("\n")
        if any(ln.startswith(("|", "    ", "#", "![")) for ln in lines):
            blocks.append(block)
        elif lines[0].startswith("- "):
            items: list[list[str]] = []
            for ln in lines:
                if ln.startswith("- ") or not items:
                    items.append([ln])
                else:
                    items[-1].append(ln.strip())
            blocks.append("\n".join(_fill(" ".join(it), "  ") for it in items))
        else:
            blocks.append(_fill(" ".join(ln.strip() for ln in lines)))
    return "\n\n".join(blocks)


def render() -> str:
    """The whole page, from the files as they are now."""
    return wrap("\n\n".join(f() for f in SECTIONS)) + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically, with the project's writer."""
    atomic_write_bytes(path, [text.encode()])
