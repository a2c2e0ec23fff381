"""The page: header, static sections, the ``SECTIONS`` order, wrapping and the atomic write."""

from __future__ import annotations

import datetime
import textwrap
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import results_quality as rq

from edgeadapt.bench.run import device_name
from edgeadapt.format.container import atomic_write_bytes

from . import claims, data, fusion, shira, sira, smollm2, sora, switching
from .data import NOTES, metrics, num

COMMAND = "PYTHONPATH=. .venv/bin/python scripts/results.py"


def hardware() -> str:
    """CPU model, visible cores (as the bench JSONs name the device) and torch version of the
    machine rendering the page."""
    try:
        torch = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch = "not installed"
    return f"{device_name()}, torch {torch}"


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


def section_header() -> str:
    """Title, the command, the machine, the model and the default setting."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""# Results: adapter quality on real models

**Generated page: do not edit by hand.** Every number and verdict below is computed at render
time from the runs' `runs/mp/<name>/metrics.json`, `runs/mp/fusion.json` and the committed
`docs/bench/*.json`. The one command that makes it (also `make results`; `make results
RESULTS_ARGS=--render-only` only re-renders):

    {COMMAND} [--jobs N] [--render-only] [--out docs/results.md]

Without `--render-only` it first trains every missing run of `scripts/results_quality.py`
(`--jobs` at a time, default 2, one torch thread each), re-runs `scripts/results_fusion.py
--plot docs/fusion.png --recheck` when its output is missing or older than its runs, and re-draws
`docs/switch_size.png`; `--render-only` only re-renders (seconds). It does not run `edgeadapt
bench` (section 5 says how each bench JSON was made). Full run from scratch: {wall_estimate()}.

The hand-written lab notebook with the exploratory analysis of these runs (learning-rate levers,
mask-row concentration, the pooler-head findings, majority-class rates) is
[`{NOTES}`]({NOTES}), frozen on 2026-11-23.

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
    section_header, claims.section_claims, shira.section_1, shira.section_1_0, shira.section_1a,
    shira.section_1b, shira.section_1c, sora.section_2, sora.section_2b, sira.section_3,
    sira.section_3b, sira.section_3c, fusion.section_4, switching.section_5, section_6,
    smollm2.section_7, section_not_done,
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
