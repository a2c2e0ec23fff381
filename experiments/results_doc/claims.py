"""The claims summary: one computed row per claim, from the sections' own helpers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .data import (
    NOT_MEASURED,
    NOT_RUN,
    bench_report,
    mean,
    num,
    paired,
    pts,
    seeds_text,
    series,
)
from .fusion import concept_losses, fusion_verdict, rel
from .shira import issue2_check, shira_vs_lora_settings, targets_compare
from .sira import MIXS_LORA, MIXS_SIRA
from .sora import LORA_2B, SORA_2B, SoraResult, mean_met, sora_results, xi_schedule
from .switching import BENCH_MAIN, bench_targets


@dataclass
class Claim:
    """One row of the claims summary."""

    claim: str
    paper: str
    measured: str
    verdict: str


def claim_issue2() -> Claim:
    """Section 1.0's check as a claims row."""
    p, _ = issue2_check()
    paper = "SHiRA beats the frozen model (issue 2)"
    if p is None:
        return Claim("SHiRA beats the frozen probe, clear margin (1.0)", paper, NOT_RUN,
                     NOT_MEASURED)
    measured = (f"{num(mean(p.b))} vs {num(mean(p.a))} ({pts(p.gap)} points), ahead with "
                f"{p.wins} of {len(p.seeds)} seeds")
    return Claim("SHiRA beats the frozen probe, clear margin (1.0)", paper, measured,
                 "yes" if p.clear else "no")


def claim_shira_lora() -> list[Claim]:
    """SHiRA >= LoRA at equal parameters: one row per setting."""
    rows = []
    for setting, p, lower in shira_vs_lora_settings():
        claim = f"SHiRA >= LoRA at equal params: {setting}"
        paper = "+2.7 points (LLaMA-7B commonsense, SNIP)"
        if p is None:
            rows.append(Claim(claim, paper, NOT_RUN, NOT_MEASURED))
            continue
        if lower:
            measured = f"perplexity {num(mean(p.b), 1)} vs LoRA {num(mean(p.a), 1)}"
            ok = mean(p.b) <= mean(p.a)
        else:
            measured = (f"{num(mean(p.b))} vs LoRA {num(mean(p.a))} ({pts(p.gap)} points, "
                        f"{seeds_text(p.seeds)})")
            ok = p.gap >= 0
        rows.append(Claim(claim, paper, measured, "yes" if ok else "no"))
    return rows


def sora_verdict(res: Sequence[SoraResult]) -> str:
    """'yes' (every seed), 'partly (k of n seeds)', 'no', or 'not measured'."""
    if not res:
        return NOT_MEASURED
    k = sum(r.met for r in res)
    if k == len(res):
        return "yes"
    return f"partly ({k} of {len(res)} seeds)" if k else "no"


def sora_measured(res: Sequence[SoraResult]) -> str:
    """Kept fraction and gap, averaged over seeds, and the target on those means."""
    if not res:
        return NOT_RUN
    on_mean = "" if len(res) < 2 else f"; on the means: {'met' if mean_met(res) else 'not met'}"
    return (f"keeps {num(100 * mean([r.kept_frac for r in res]), 1)}% of the params, "
            f"{num(mean([r.sora for r in res]))} vs LoRA {num(mean([r.lora for r in res]))} "
            f"({pts(mean([r.sora - r.lora for r in res]))} points, "
            f"{seeds_text([r.seed for r in res])}){on_mean}")


Series = list[tuple[int, str]]


def sora_settings() -> dict[str, tuple[Series, Series]]:
    """section -> (LoRA r=16 runs, SoRA runs), read from results_quality.RUNS when called."""
    return {
        "2": ([(0, "rt-lora-r16-1ep")], [(0, "rt-sora-r16-linear-1ep")]),
        **{f"2b, {xi_schedule(f'{stem}-s0')}": (series(LORA_2B), series(stem))
           for stem in SORA_2B},
        "3b": (series("rt-lora-r16-1ep-lin"), series("rt-sora-r16-linear-1ep-lin")),
        "7, SmolLM2 sentiment, r_max = LoRA's 8": ([(0, "sm-rt-lora-r8")], [(0, "sm-rt-sora-r8")]),
    }


def claim_sora() -> list[Claim]:
    """SoRA keeps <= 70% of LoRA's parameters (r = SoRA's r_max) within 1 point: one row per
    setting."""
    rows = []
    for section, (lora, sora) in sora_settings().items():
        res = sora_results(lora, sora)
        rank = "8" if section.startswith("7") else "16"
        rows.append(Claim(f"SoRA: <= 70% of LoRA r={rank}'s params, within 1 point ({section})",
                          "matches LoRA with fewer params", sora_measured(res),
                          sora_verdict(res)))
    return rows


def sira_settings() -> dict[str, tuple[Series, Series]]:
    """section -> (LoRA runs, SiRA runs) at equal parameters, read when called."""
    return {
        "3, rt+politics": ([(0, "mix-lora-r10-1ep")], [(0, "mix-sira-e4r2-1ep")]),
        "3b, rt+politics": (series("mix-lora-r10-1ep-lin"), series("mix-sira-e4r2-1ep-lin")),
        "3c, rt+subjectivity": (series(MIXS_LORA), series(MIXS_SIRA)),
    }


def claim_sira() -> list[Claim]:
    """SiRA >= LoRA on the multi-task mean accuracy: one row per setting."""
    rows = []
    for section, (lora, sira) in sira_settings().items():
        p = paired(lora, sira)
        claim = f"SiRA >= LoRA multi-task, equal params ({section})"
        if p is None:
            rows.append(Claim(claim, "SiRA >= LoRA", NOT_RUN, NOT_MEASURED))
            continue
        measured = (f"mean accuracy {num(mean(p.b))} vs LoRA {num(mean(p.a))} ({pts(p.gap)} points;"
                    f" ahead with {p.wins} of {len(p.seeds)} seeds)")
        rows.append(Claim(claim, "SiRA >= LoRA", measured, "yes" if p.gap >= 0 else "no"))
    return rows


def claim_fusion() -> Claim:
    """LoRA loses more than SHiRA when fused, on every task the adapters learned (section 4)."""
    claim = "Fusion: LoRA loses more than SHiRA, on every learned task (4)"
    paper = "LoRA -11.1%, SHiRA -3.6 to -4.4%"
    losses = concept_losses()
    if not losses:
        return Claim(claim, paper, NOT_RUN, NOT_MEASURED)
    measured = "; ".join(f"{c.label}: LoRA {rel(c.lora)}, SHiRA {rel(c.shira)} (difference "
                         f"{num(c.diff, 1)} points, one SE {num(c.se, 1)})" for c in losses)
    return Claim(claim, paper, measured, fusion_verdict(losses))


def claim_targets() -> Claim:
    """All projections vs q/v (section 1b) as a claims row."""
    p = targets_compare()
    claim = "All projections buy accuracy over q/v (1b)"
    paper = "issue 7: decides the default `--targets`"
    if p is None:
        return Claim(claim, paper, NOT_RUN, NOT_MEASURED)
    measured = (f"q/v {num(mean(p.b))} vs all {num(mean(p.a))} (q/v {pts(p.gap)} points, "
                f"{seeds_text(p.seeds)})")
    verdict = "no: q/v stays the default" if p.gap >= 0 else "yes: all ahead"
    return Claim(claim, paper, measured, verdict)


def claim_bench() -> list[Claim]:
    """One row per issue-6 target: the value and pass / miss of every headline bench report."""
    per: dict[str, list[tuple[str, str, bool | None]]] = {}
    for column, (name, backend) in BENCH_MAIN.items():
        report = bench_report(name)
        targets = bench_targets(report, backend) if report else []
        for target, value, ok in targets:
            shown = "-" if value is None else (f"{num(value, 1)}x" if value >= 5 else
                                               num(value, 3))
            per.setdefault(target, []).append((column, shown, ok))
    if not per:
        return [Claim("issue 6 targets, SmolLM2 q/v (5)", "issue 6", NOT_RUN, NOT_MEASURED)]
    rows = []
    for target, vals in per.items():
        measured = "; ".join(f"{col}: {shown}" for col, shown, _ in vals)
        met = [col for col, _, ok in vals if ok]
        judged = [v for v in vals if v[2] is not None]
        verdict = (NOT_MEASURED if not judged else "yes" if len(met) == len(judged) else
                   "no" if not met else f"only {', '.join(met)}")
        rows.append(Claim(f"SmolLM2 q/v: {target} (5)", "issue 6 target", measured, verdict))
    return rows


def claims() -> list[Claim]:
    """Every claim row of the summary, in page order."""
    return [claim_issue2(), *claim_shira_lora(), claim_targets(), *claim_sora(), *claim_sira(),
            claim_fusion(), *claim_bench()]


def section_claims() -> str:
    """The claims summary table."""
    lines = ["## Claims summary", "",
             "Each row is computed from the runs of the section in brackets. \"yes\" / \"no\" "
             "is the claim as stated, on the runs that exist; \"not measured\" means a run is "
             "missing.", "",
             "| claim | paper / target | measured here | reproduces? |", "|---|---|---|---|"]
    lines += [f"| {c.claim} | {c.paper} | {c.measured} | {c.verdict} |" for c in claims()]
    return "\n".join(lines)
