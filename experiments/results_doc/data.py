"""Reading the run files, number formatting, seed pairing and the markdown run tables.

Every other module of the page reads the runs through ``metrics`` / ``series`` /
``fusion_results`` / ``bench_report``; tests point ``RUNS_DIR`` and ``BENCH_DIR``
elsewhere."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

from experiments import results_quality as rq

RUNS_DIR = Path("runs/mp")
BENCH_DIR = Path("docs/bench")
NOTES = "../experiments/results_notes.md"

NOT_RUN = "(not run)"
NOT_MEASURED = "not measured"

Metrics = dict
Column = tuple[str, Callable[[Metrics], str]]


def metrics(name: str) -> Metrics | None:
    """The run's metrics.json, or None when the run has not been trained."""
    path = RUNS_DIR / name / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else None


def acc(name: str, key: str = "accuracy") -> float | None:
    """A test metric of run ``name`` (None when the run is missing)."""
    m = metrics(name)
    return None if m is None else float(m["test"][key])


def series(stem: str) -> list[tuple[int, str]]:
    """(seed, run name) for every ``{stem}-s{seed}`` defined in results_quality.RUNS."""
    out = []
    for name in rq.RUNS:
        head, _, seed = name.rpartition("-s")
        if head == stem and seed.isdigit():
            out.append((int(seed), name))
    return sorted(out)


def bench_report(name: str) -> dict | None:
    """A committed bench report (docs/bench/<name>.json), or None."""
    path = BENCH_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def fusion_results() -> list[dict] | None:
    """runs/mp/fusion.json (experiments/results_fusion.py), or None."""
    path = RUNS_DIR / "fusion.json"
    return json.loads(path.read_text()) if path.exists() else None


def mean(xs: Sequence[float]) -> float:
    """Arithmetic mean of a non-empty sequence."""
    return sum(xs) / len(xs)


def spread(xs: Sequence[float]) -> float:
    """Seed-to-seed spread (max - min), in the same unit as ``xs``."""
    return max(xs) - min(xs)


def num(x: float, nd: int = 3, sign: bool = False) -> str:
    """``x`` rounded half away from zero at ``nd`` decimals, after dropping float32 noise, so that
    an accuracy of 327/400 stored as 0.81749999 prints as 0.818 ('+' with ``sign``)."""
    d = Decimal(repr(round(x, nd + 4))).quantize(Decimal(1).scaleb(-nd), rounding=ROUND_HALF_UP)
    if d == 0:
        d = abs(d)
    return ("+" if sign and d >= 0 else "") + f"{d:f}"


def pts(diff: float) -> str:
    """An accuracy difference in signed points (0.07 -> '+7.0')."""
    return num(100 * diff, 1, True)


def binomial_se(p: float, n: int) -> float:
    """Standard error of one accuracy ``p`` measured on ``n`` examples (a fraction)."""
    return math.sqrt(p * (1 - p) / n)


def seeds_text(seeds: Sequence[int]) -> str:
    """'seeds 0 / 1 / 2'."""
    return "seed" + ("s " if len(seeds) > 1 else " ") + " / ".join(map(str, seeds))


@dataclass
class Paired:
    """Two methods compared seed by seed (only the seeds both have run)."""

    seeds: list[int]
    a: list[float]  # the reference (e.g. the frozen probe)
    b: list[float]  # the method tested against it

    @property
    def gaps(self) -> list[float]:
        """b - a per seed."""
        return [y - x for x, y in zip(self.a, self.b, strict=True)]

    @property
    def gap(self) -> float:
        """Mean of b minus mean of a."""
        return mean(self.b) - mean(self.a)

    @property
    def wins(self) -> int:
        """Seeds where b is strictly ahead of a."""
        return sum(g > 0 for g in self.gaps)

    @property
    def clear(self) -> bool:
        """b ahead with every seed, and by more (in mean) than either method's seed spread."""
        noise = max(spread(self.a), spread(self.b))
        return len(self.seeds) >= 2 and self.wins == len(self.seeds) and self.gap > noise

    def gaps_text(self) -> str:
        """'+4.5 / +5.1 / +5.0'."""
        return " / ".join(pts(g) for g in self.gaps)


def paired(a_runs: Sequence[tuple[int, str]], b_runs: Sequence[tuple[int, str]],
           key: str = "accuracy") -> Paired | None:
    """Pair two series by seed; None when no seed has both runs."""
    a, b = dict(a_runs), dict(b_runs)
    seeds = [s for s in sorted(a) if s in b and metrics(a[s]) and metrics(b[s])]
    if not seeds:
        return None
    return Paired(seeds, [acc(a[s], key) for s in seeds], [acc(b[s], key) for s in seeds])


def short_command(name: str, prefix: Sequence[str] = ()) -> str:
    """The run's exact `edgeadapt train` command; ``prefix`` (after 'edgeadapt train') -> '...'."""
    cmd = rq.command(name)
    if prefix and cmd[2:2 + len(prefix)] == list(prefix):
        return "`... " + " ".join(cmd[2 + len(prefix):]) + "`"
    return "`" + " ".join(cmd) + "`"


def dots(prefix: Sequence[str]) -> str:
    """What '...' stands for in a table's command column."""
    return f"`...` stands for `edgeadapt train {' '.join(prefix)}`"


def params_cell(m: Metrics) -> str:
    """Adapter parameters, with the head for a frozen probe."""
    n = int(m["trainable_params"])
    return f"0 (+{m['head_params']:,} head)" if n == 0 else f"{n:,}"


ACC: Column = ("test accuracy", lambda m: f"{num(m['test']['accuracy'])}")
LOSS: Column = ("test loss", lambda m: f"{num(m['test']['loss'])}")
PARAMS: Column = ("adapter params", params_cell)
TRAIN_S: Column = ("train s", lambda m: f"{m['train_s']:.0f}")
WALL_S: Column = ("wall s", lambda m: f"{m.get('wall_s', float('nan')):.0f}")
ACCURACY = ("accuracy",)  # the test metric key of a classification run (seed_row)


def table(lead: Sequence[str], rows: Sequence[tuple[Sequence[str], str]],
          columns: Sequence[Column], prefix: Sequence[str] = ()) -> str:
    """Markdown table: leading cells, then ``columns`` computed from each run's metrics, then its
    command. A missing run shows '(not run)' in the first computed column."""
    head = [*lead, *(c[0] for c in columns), "command"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cells, name in rows:
        m = metrics(name)
        if m is None:
            values = [NOT_RUN] + [""] * (len(columns) - 1)
        else:
            values = [fn(m) for _, fn in columns]
        lines.append("| " + " | ".join([*cells, *values, short_command(name, prefix)]) + " |")
    return "\n".join(lines)


def loss_fifths(m: Metrics) -> list[float]:
    """Mean logged training-batch loss in each fifth of the steps (the every-10-steps log)."""
    steps = int(m["steps"])
    logged = [(s, v) for s, v in m["train_loss"] if s % 10 == 0 and s < steps]
    bins = [[v for s, v in logged if k * steps / 5 <= s < (k + 1) * steps / 5] for k in range(5)]
    return [mean(b) if b else float("nan") for b in bins]


def notes_link(anchor: str) -> str:
    """A pointer to the same section of the frozen lab notebook."""
    return (f"Exploratory notes on this section, with the numbers as measured on 2026-11-23: "
            f"[lab notebook, section {anchor}]({NOTES}#{anchor}).")


def run_arg(name: str, flag: str) -> str | None:
    """The value of ``flag`` in run ``name``'s definition (results_quality.RUNS), or None."""
    args = rq.RUNS.get(name, [])
    return args[args.index(flag) + 1] if flag in args[:-1] else None


def seed_head(seeds: Sequence[int]) -> list[str]:
    """Header lines of a seeds-as-columns table (run, one column per seed, mean)."""
    head = ["| run", *(f"seed {s}" for s in seeds), "mean |"]
    return [" | ".join(head), "|" + "---|" * (len(seeds) + 2)]


def common_seeds(stems: Sequence[str]) -> list[int]:
    """Seeds for which every series in ``stems`` has a trained run (a table's mean column)."""
    have = [{s for s, n in series(stem) if metrics(n)} for stem in stems]
    return sorted(set.intersection(*have)) if have else []


def means_note(seeds: Sequence[int], common: Sequence[int],
               rows: str = "every method of this table", scope: str = "") -> str:
    """Under a seed table: which seeds the mean column (``scope``: of which rows) averages,
    when not all of them; ``common`` are the seeds that have run ``rows``."""
    if list(common) == list(seeds):
        return ""
    if not common:
        return f"\n\nThe mean column{scope} stays empty until one seed has run {rows}."
    return (f"\n\nThe mean column{scope} averages {seeds_text(common)} only, the seeds that have "
            f"run {rows}, so that the means compare.")


def seed_row(label: str, stem: str, seeds: Sequence[int], keys: Sequence[str] = ("accuracy",),
             mean_over: Sequence[int] | None = None) -> str:
    """One row of a seeds-as-columns table: test metric ``keys`` of run ``{stem}-s{seed}`` and
    their means over ``mean_over`` (default: the seeds that ran); 'a / b' cells with several
    keys, e.g. a mixture's per-source accuracies."""
    runs = dict(series(stem))
    cells, vals = [], []
    for s in seeds:
        m = metrics(runs.get(s, ""))
        if m is None:
            cells.append(NOT_RUN)
            continue
        cells.append(" / ".join(num(m["test"][k]) for k in keys))
        if mean_over is None or s in mean_over:
            vals.append([m["test"][k] for k in keys])
    tail = " / ".join(num(mean(col)) for col in zip(*vals, strict=True)) if vals else ""
    return "| " + " | ".join([label, *cells, tail]) + " |"
