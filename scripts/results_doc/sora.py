"""Section 2: SoRA vs LoRA r=16 (issue 3), and the SoRA helpers other sections reuse."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import results_quality as rq

from .data import (
    ACC,
    NOT_MEASURED,
    NOT_RUN,
    TRAIN_S,
    Metrics,
    dots,
    mean,
    metrics,
    notes_link,
    num,
    pts,
    series,
    spread,
    table,
)


@dataclass
class SoraResult:
    """SoRA vs LoRA r=16 for one seed."""

    seed: int
    lora: float
    sora: float
    kept: int
    lora_params: int

    @property
    def kept_frac(self) -> float:
        """Parameters kept after pruning, as a fraction of LoRA r=16's."""
        return self.kept / self.lora_params

    @property
    def behind(self) -> float:
        """LoRA minus SoRA accuracy, in points (rounded to 0.1 as printed)."""
        return round(100 * (self.lora - self.sora), 1)

    @property
    def met(self) -> bool:
        """<= 70% of the parameters and at most 1 point behind LoRA."""
        return self.kept_frac <= 0.70 and self.behind <= 1.0


def sora_results(lora: Sequence[tuple[int, str]],
                 sora: Sequence[tuple[int, str]]) -> list[SoraResult]:
    """Per-seed SoRA results for the seeds where both runs exist."""
    out = []
    lora_d = dict(lora)
    for seed, name in sora:
        ms, ml = metrics(name), metrics(lora_d.get(seed, ""))
        if ms is None or ml is None:
            continue
        out.append(SoraResult(seed, ml["test"]["accuracy"], ms["test"]["accuracy"],
                              int(ms["sora"]["params_after"]), int(ml["trainable_params"])))
    return out


def section_2() -> str:
    lora_n, sora_n = "rt-lora-r16-1ep", "rt-sora-r16-linear-1ep"
    lora_m = metrics(lora_n)

    def kept(m: Metrics) -> str:
        if "sora" not in m:
            return f"{m['trainable_params']:,}"
        n = m["sora"]["params_after"]
        frac = "" if lora_m is None else f" ({num(100 * n / lora_m['trainable_params'], 1)}%)"
        return f"{n:,}{frac}"

    cols = [ACC, ("params trained", lambda m: f"{m['trainable_params']:,}"),
            ("params kept", kept), TRAIN_S]
    rows = [(["LoRA r=16"], lora_n),
            (["SoRA r_max=16, linear xi 1e-3 -> 1.5e-2 over 4 stages"], sora_n)]
    return f"""## 2. SoRA r_max=16 with a sparsifying scheduler vs LoRA r=16 (issue 3)

Both 1 epoch (63 steps), seed 0; {dots(rq.RT1)}.

{table(["run"], rows, cols, rq.RT1)}

Gates: randn init, own AdamW at lr 2e-3, proximal soft-threshold after each gate step; "params
kept" = A' and B' at the live ranks after pruning (the gate is folded into B'), as a share of
LoRA r=16's parameters.

{stages_table(sora_n)}

{sora_text(sora_results([(0, lora_n)], [(0, sora_n)]), sora_n)}

{notes_link("2")}"""


def stages_table(name: str) -> str:
    """SoRA's per-stage xi, live rank and accuracy (metrics.json `stages`)."""
    m = metrics(name)
    if m is None or "sora" not in m:
        return f"SoRA stages: {NOT_RUN}."
    total = m["sora"]["r_max"] * len(m["sora"]["live_ranks"])
    rows = [f"| stage | steps | xi | live rank (of {total}) | test accuracy |",
            "|---|---|---|---|---|"]
    rows += [f"| {st['stage']} | {st['step']} | {st['xi']:.4f} | {st['live_rank_total']} | "
             f"{num(st['accuracy'])} |" for st in m.get("stages", [])]
    ranks = list(m["sora"]["live_ranks"].values())
    return ("\n".join(rows) + f"\n\nFinal live ranks per q/v matrix: {min(ranks)}-{max(ranks)} of "
            f"{m['sora']['r_max']} (`runs/mp/{name}/metrics.json`, `sora.live_ranks`).")


def sora_text(res: Sequence[SoraResult], stages_of: str | None = None) -> str:
    """'What came out' for SoRA vs LoRA (computed)."""
    if not res:
        return f"**What came out:** {NOT_MEASURED} (runs missing)."
    per_seed = "; ".join(f"seed {r.seed}: {num(100 * r.kept_frac, 1)}% kept, "
                         f"{pts(r.sora - r.lora)} points" for r in res)
    k = sum(r.met for r in res)
    verdict = ("met" if k == len(res) else
               f"met for {k} of {len(res)} seeds" if k else "not met")
    mean_gap = mean([r.behind for r in res])
    lines = [f"**What came out.** The issue-3 target (<= 70% of LoRA r=16's parameters, within 1 "
             f"point) is **{verdict}**: {per_seed}; mean {pts(-mean_gap / 100)} points."]
    m = metrics(stages_of) if stages_of else None
    if m is not None and m.get("stages"):
        accs = [st["accuracy"] for st in m["stages"]]
        lines.append(f"The stage accuracies of this one run move by up to "
                     f"{num(100 * spread(accs), 1)} points between stages, so a 1-point difference "
                     f"is inside its noise.")
    return " ".join(lines)


def kept_row(lora_stem: str, sora_stem: str, seeds: Sequence[int]) -> str:
    """SoRA's kept parameters per seed, as a share of LoRA's."""
    res = {r.seed: r for r in sora_results(series(lora_stem), series(sora_stem))}
    cells = [f"{res[s].kept:,} ({num(100 * res[s].kept_frac, 1)}%)" if s in res else NOT_RUN
             for s in seeds]
    tail = f"{num(100 * mean([r.kept_frac for r in res.values()]), 1)}%" if res else ""
    return "| " + " | ".join(["SoRA params kept after pruning (share of LoRA r=16's)", *cells,
                              tail]) + " |"
