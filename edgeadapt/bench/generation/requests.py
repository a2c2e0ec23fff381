"""The switch between two requests, as a server would do it: ``rt.switch(A)``, answer a request,
``rt.switch(B)``, answer the next, ...; then the check that the switches really switched and
that the base comes back bit for bit.

Each request is timed with :func:`edgeadapt.timer.stopwatch`: the switch (wall time, from the
call to its return) and the answer (``rt.generate`` of a ``reply_tokens``-token reply to the
prompt, prefill included). ``ratio_vs_answer`` is the median over requests of switch / answer
(p90 beside it): the share of a request the switch costs.

The checks, before the row is reported (ParityError otherwise): the forward bench's
:func:`edgeadapt.bench.switch.check_switch` (the runtime switched to each adapter matches the
PyTorch model carrying it; back at the base, its output is bit-identical to the output before
its first switch), and :func:`check_restore`: every live weight equal, bit for bit, to the
bundle's (its sha256 in bundle.json).
"""

from __future__ import annotations

import numpy as np

from edgeadapt.bench.backends import Target
from edgeadapt.bench.parity import ParityLog
from edgeadapt.bench.switch import Cycle, check_switch
from edgeadapt.bench.timing import Stats, paired_ratios
from edgeadapt.errors import ParityError
from edgeadapt.format.fingerprint import weight_sha256
from edgeadapt.runtime import Runtime
from edgeadapt.timer import stopwatch


def check_restore(rt: Runtime, target: Target, what: str) -> dict:
    """Switch ``rt`` to the base and compare every live weight with the bundle's sha256;
    ParityError naming the first that differs. Returns the parity row."""
    rt.switch(None)
    weights = rt.live_weights()
    for name, value in weights.items():
        if weight_sha256(value) != rt.manifest.weights[name].sha256:
            raise ParityError(f"{target.key} {what}: back at the base, live weight {name!r} is "
                              "not the bundle's bit for bit; refusing to report its timings")
    return {**target.fields(), "case": "shira-fused", "check": "restore-weights",
            "after": what, "weights": len(weights), "bit_exact": True}


def time_requests(rt: Runtime, target: Target, names: list[str], prompt: np.ndarray, *,
                  reply_tokens: int, requests: int, warmup: int) -> dict:
    """The row of ``requests`` timed requests (after ``warmup`` untimed ones), alternating
    between the adapters ``names``."""
    switch_ms: list[float] = []
    answer_ms: list[float] = []
    for i in range(warmup + requests):
        lap = stopwatch()
        rt.switch(names[i % len(names)])
        switched = lap()
        rt.generate(prompt, max_new_tokens=reply_tokens)
        if i >= warmup:
            switch_ms.append(1000.0 * switched)
            answer_ms.append(1000.0 * (lap() - switched))
    shares = paired_ratios(switch_ms, answer_ms)
    answer = Stats.of(answer_ms)
    return {**target.fields(), "method": "between-requests", "adapters": list(names),
            **Stats.of(switch_ms).as_dict(), "answer_p50_ms": answer.p50_ms,
            "answer_p90_ms": answer.p90_ms, "answer_tokens": reply_tokens,
            "prompt_tokens": int(prompt.size), "ratio_vs_answer": float(np.median(shares)),
            "ratio_vs_answer_p90": float(np.percentile(shares, 90))}


def check_requests(parity: ParityLog, rt: Runtime, target: Target, names: list[str],
                   base_out: np.ndarray) -> list[dict]:
    """The checks of the module docstring on ``rt`` after its series; the rows of the bit-exact
    weights check (the forward checks' rows go to ``parity``)."""
    check_switch(parity, target, "between-requests", "live", "shira-fused",
                 Cycle(rt.switch, names), names, rt.store.run, lambda: rt.switch(None),
                 base_out)
    return [check_restore(rt, target, "between-requests")]
