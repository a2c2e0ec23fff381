"""What the benchmark makes of its samples: percentiles, ratios, pooled sessions, break-even.

Every comparison the benchmark reports is a ratio of two cases measured in the *same* run,
interleaved round by round by :func:`edgeadapt.timer.time_interleaved` (the samples' source),
so slow drift of the machine hits every case alike and cancels in the ratio.

Units: every duration here is in milliseconds (float).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from edgeadapt.errors import ConfigError


@dataclass(frozen=True)
class Stats:
    """Percentiles of one case's samples (ms), numpy's linear interpolation between order stats.

    For n sorted samples x_0..x_{n-1}, the q-th percentile is x at position q/100 * (n - 1),
    interpolated linearly between its two neighbours.
    """

    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    n: int

    @classmethod
    def of(cls, samples_ms: Sequence[float]) -> Stats:
        x = np.asarray(samples_ms, dtype=np.float64)
        if x.size == 0:
            raise ConfigError("no samples to summarise: repeats must be >= 1")
        p50, p90, p99 = np.percentile(x, [50, 90, 99])
        return cls(float(p50), float(p90), float(p99), float(x.mean()), int(x.size))

    def as_dict(self) -> dict[str, float | int]:
        return {"p50_ms": self.p50_ms, "p90_ms": self.p90_ms, "p99_ms": self.p99_ms,
                "mean_ms": self.mean_ms, "n": self.n}


def ratio_of_medians(a_ms: Sequence[float], b_ms: Sequence[float]) -> float:
    """median(a) / median(b): how many times slower case a is than case b."""
    b = float(np.median(np.asarray(b_ms, dtype=np.float64)))
    if b <= 0.0:
        raise ConfigError("ratio against a case whose median time is not positive")
    return float(np.median(np.asarray(a_ms, dtype=np.float64))) / b


def paired_ratios(a_ms: Sequence[float], b_ms: Sequence[float]) -> np.ndarray:
    """Per-round ratios a_i / b_i of two interleaved cases (same round i = same machine state).

    a_ms, b_ms: (n,) samples of the two cases from the same interleaved run, round by round.
    """
    a = np.asarray(a_ms, dtype=np.float64)
    b = np.asarray(b_ms, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ConfigError(
            f"paired ratios need two equally long, non-empty sample lists; got {a.shape}, {b.shape}"
        )
    if np.any(b <= 0.0):
        raise ConfigError("paired ratio against a non-positive sample")
    return a / b


@dataclass(frozen=True)
class Ratio:
    """A comparison of case ``num`` against case ``den`` from one interleaved run.

    of_medians = median(num) / median(den); paired_median = median_i(num_i / den_i);
    paired_p10 / paired_p90: the spread of the per-round ratios.
    """

    num: str
    den: str
    of_medians: float
    paired_median: float
    paired_p10: float
    paired_p90: float

    @classmethod
    def of(cls, samples: Mapping[str, Sequence[float]], num: str, den: str) -> Ratio:
        pr = paired_ratios(samples[num], samples[den])
        p10, p50, p90 = np.percentile(pr, [10, 50, 90])
        return cls(num, den, ratio_of_medians(samples[num], samples[den]),
                   float(p50), float(p10), float(p90))

    def as_dict(self) -> dict[str, float | str]:
        return {"num": self.num, "den": self.den, "ratio_of_medians": self.of_medians,
                "paired_median": self.paired_median, "paired_p10": self.paired_p10,
                "paired_p90": self.paired_p90}


INSTANCE_SEP = "#"


def instance_name(variant: str, i: int) -> str:
    """The case name of instance ``i`` of ``variant`` in an interleaved run (``variant#i``)."""
    return f"{variant}{INSTANCE_SEP}{i}"


def combine_instances(samples: Mapping[str, Sequence[float]]
                      ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Fold the samples of several instances of a case (``variant#0``, ``variant#1``, ...: K
    independent sessions/programs of the same variant, timed in the same interleaved run).

    Returns ``(pooled, per_round)``: pooled[v] is every sample of every instance of v (for the
    percentiles); per_round[v][r] = (prod_i t_{v#i, r}) ** (1 / K), the geometric mean over the
    instances in round r, so that ``Ratio.of(per_round, v, "base")`` is
    median_r prod_i (t_{v#i,r} / t_{base#i,r}) ** (1 / K) for equal K: a per-session offset
    (one session's memory layout, which no repeat of that session removes) averages out instead
    of deciding the ratio. Names without the separator are single instances and pass through.
    """
    groups: dict[str, list[Sequence[float]]] = {}
    for name, xs in samples.items():
        groups.setdefault(name.split(INSTANCE_SEP, 1)[0], []).append(xs)
    pooled: dict[str, list[float]] = {}
    per_round: dict[str, list[float]] = {}
    for v, series in groups.items():
        if len({len(xs) for xs in series}) != 1:
            raise ConfigError(f"instances of {v!r} have different sample counts")
        arr = np.asarray(series, dtype=np.float64)  # (K, rounds)
        if np.any(arr <= 0.0):
            raise ConfigError(f"non-positive sample among the instances of {v!r}")
        pooled[v] = [float(x) for x in arr.reshape(-1)]
        per_round[v] = [float(x) for x in np.exp(np.log(arr).mean(axis=0))]
    return pooled, per_round


def break_even_runs(live_forward_ms: float, repack_forward_ms: float,
                    live_switch_ms: float, repack_switch_ms: float) -> float:
    """Runs per switch above which repack mode beats live mode.

    Cost per switch cycle with n runs: live = s_live + n * f_live; repack = s_repack + n *
    f_repack. Repack wins when n > (s_repack - s_live) / (f_live - f_repack). Returns ``inf``
    when live forwards are not slower (repack never wins), and 0.0 when repack switches are not
    dearer (repack always wins).
    """
    extra_switch = repack_switch_ms - live_switch_ms
    saving_per_run = live_forward_ms - repack_forward_ms
    if saving_per_run <= 0.0:
        return float("inf")
    if extra_switch <= 0.0:
        return 0.0
    return extra_switch / saving_per_run

