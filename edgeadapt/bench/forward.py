"""Forward timing: per (batch, seq), every case of a backend checked, then timed interleaved.

Per shape: inputs from the parity subject, checked once (names, dtypes, shapes, id range)
outside the timed loop; each case's output compared with the PyTorch reference carrying its adapter
(:meth:`edgeadapt.bench.parity.ParityLog.forward`: ParityError before anything is timed); then
all cases timed in the same interleaved rounds (:func:`edgeadapt.timer.time_interleaved`).

A row per variant: the percentiles of its pooled samples (ms; every instance, every round) and
``ratio_vs_base`` = median over rounds r of ``t_variant,r / t_base,r`` with each side the
geometric mean over its instances in round r (:func:`edgeadapt.bench.timing.combine_instances`),
p10 / p90 of the same per-round ratios beside it.
"""

from __future__ import annotations

from edgeadapt.bench.backends import Target
from edgeadapt.bench.cases import Case, variant_mode
from edgeadapt.bench.options import BenchContext
from edgeadapt.bench.parity import ParityLog
from edgeadapt.bench.timing import Ratio, Stats, combine_instances
from edgeadapt.runtime.inputs import check_inputs
from edgeadapt.timer import time_interleaved


def time_forward(ctx: BenchContext, target: Target, cases: dict[str, Case], parity: ParityLog
                 ) -> list[dict]:
    """The forward rows of ``target`` for every shape of ``ctx.opts`` (see the module
    docstring); the parity rows go to ``parity``."""
    opts = ctx.opts
    rows: list[dict] = []
    for batch, seq in opts.shape_list():
        inputs = check_inputs(ctx.manifest.inputs, parity.subject.inputs(batch, seq))
        refs: dict = {}
        for case, (fn, adapter) in cases.items():
            parity.forward(target, case, fn, adapter, inputs, refs)
        samples = time_interleaved({c: (lambda f=fn, x=inputs: f(x)) for c, (fn, _) in
                                    cases.items()}, repeats=opts.repeats, warmup=opts.warmup,
                                   progress=ctx.progress)
        pooled, per_round = combine_instances(samples)
        for variant, xs in pooled.items():
            r = Ratio.of(per_round, variant, "base")
            rows.append({**target.fields(), "variant": variant, "batch": batch, "seq": seq,
                         "runtime_mode": variant_mode(target, variant),
                         "sessions": opts.sessions, **Stats.of(xs).as_dict(),
                         "ratio_vs_base": r.paired_median, "ratio_vs_base_p10": r.paired_p10,
                         "ratio_vs_base_p90": r.paired_p90})
    return rows
