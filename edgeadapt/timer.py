"""The project's one timer: every timing loop (the benchmark, the quickstart's table, the export
and lab measurements) runs through :func:`time_calls` or :func:`time_interleaved`.

- :func:`time_calls`: one callable, ``warmup`` untimed calls, then ``repeats`` timed ones.
- :func:`time_interleaved`: several callables timed round by round in a rotating order
  (A B C, B C A, C A B, ...), so that slow drift of the machine (other processes, frequency
  scaling, thermal state) hits every case alike and cancels in a ratio of two of them;
- :func:`stopwatch`: the wall time of one long step (an export, a training run), in seconds.

Units: every duration the loops return is in milliseconds (float). Clocks are nanosecond counters
(``time.perf_counter_ns`` by default; tests inject fake ones). Torch-free (stdlib only).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

from edgeadapt.errors import ConfigError

Clock = Callable[[], float]  # nanoseconds, monotonic
NS_PER_MS = 1e6


def time_calls(fn: Callable[[], object], *, repeats: int, warmup: int = 0,
               setup: Callable[[], object] | None = None,
               clock: Clock = time.perf_counter_ns) -> list[float]:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times timed; the durations in ms.

    setup: called untimed right before *every* call of ``fn``, warm-up calls included (e.g.
        switching back to the base before each timed switch).
    Returns ``repeats`` durations in call order: ``(clock() after - clock() before) / 1e6``.
    """
    if repeats < 1 or warmup < 0:
        raise ConfigError(f"repeats must be >= 1 and warmup >= 0; got {repeats}, {warmup}")
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    out: list[float] = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        t0 = clock()
        fn()
        out.append((clock() - t0) / NS_PER_MS)
    return out


def stopwatch(clock: Callable[[], float] = time.perf_counter) -> Callable[[], float]:
    """Start a stopwatch: returns a function giving the seconds elapsed since this call
    (``clock``: seconds, monotonic)."""
    t0 = clock()
    return lambda: clock() - t0


def interleaved_order(names: Sequence[str], round_index: int) -> list[str]:
    """The order of the cases in round ``round_index``: the list rotated by the round number,
    so that no case always runs first (right after a cold gap) or always after the same one."""
    k = round_index % len(names)
    return list(names[k:]) + list(names[:k])


FLUSH_PREFIX = "flush>"


def flush_key(name: str) -> str:
    """The key under which :func:`time_interleaved` keeps the flush timed right before ``name``."""
    return FLUSH_PREFIX + name


def time_interleaved(
    cases: Mapping[str, Callable[[], object]],
    *,
    repeats: int,
    warmup: int = 3,
    inner: int = 1,
    progress: Callable[[int], object] | None = None,
    clock: Clock = time.perf_counter_ns,
    flush: Callable[[], object] | None = None,
) -> dict[str, list[float]]:
    """Run every case ``warmup`` times, then ``repeats`` interleaved rounds; return ms samples.

    cases: name -> zero-argument callable (one forward, or one full switch).
    inner: calls per timed sample (the sample is their mean), for calls too short to time alone.
    progress: called with 1 after each timed call of a case (e.g. ``tqdm.update``).
    clock: a nanosecond clock (injectable for tests).
    flush: called immediately before *every* timed call of every case (e.g. a copy larger
        than the caches, so that every sample of every case starts from the same cold cache,
        whatever the rotation put before it); it is timed apart, under
        ``flush_key(name)`` for the case it preceded, and never counted in the case's sample.
    Returns name -> list of ``repeats`` durations in ms, in round order, so samples of two
    cases at the same position were taken in the same round.
    """
    if repeats < 1 or warmup < 0 or inner < 1:
        raise ConfigError(f"repeats must be >= 1, warmup >= 0, inner >= 1; got "
                          f"{repeats}, {warmup}, {inner}")
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    if flush is not None:
        samples.update({flush_key(name): [] for name in names})
    for r in range(repeats):
        for name in interleaved_order(names, r):
            fn = cases[name]
            if flush is not None:
                t0 = clock()
                flush()
                samples[flush_key(name)].append((clock() - t0) / NS_PER_MS)
            t0 = clock()
            for _ in range(inner):
                fn()
            samples[name].append((clock() - t0) / NS_PER_MS / inner)
            if progress is not None:
                progress(1)
    return samples
