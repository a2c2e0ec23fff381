"""Switch timing and its parity: every call a full switch (undo the previous adapter, apply the
next, cycling between two adapters), then a check that the switches really switched.

Two interleaved series per backend, the floor's 128 MiB copy right before every timed switch
(each switch starts from the same cold cache, :class:`edgeadapt.bench.floor.CopyProbe`):

- fast: ``shira`` (live), ``lora-fuse`` (live: exact restore from the saved matrices) and, on
  ONNX Runtime CPU, ``ort-adapter`` (new RunOptions with the other adapter active);
- slow (``reload_repeats`` rounds): ``reload`` (``edgeadapt.runtime.load`` of the bundle: what
  re-creating the session / program from files costs) and ``shira`` in repack mode (rebuild
  included), with the live SHiRA switch again in the same rounds.

Every row's ``ratio_vs_shira`` = median over rounds r of ``t_method,r / t_shira,r`` against
the live SHiRA switch timed in the same round (:func:`switch_row`). Before any timing of a
series is reported, :func:`check_switch` switches to each adapter of its cycle and back to the
base and compares with PyTorch (ParityError otherwise).
"""

from __future__ import annotations

import gc
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgeadapt.bench import floor as fl
from edgeadapt.bench.backends import Target
from edgeadapt.bench.cases import SwitchRuntimes, load_runtime, reload_mode
from edgeadapt.bench.options import BenchContext
from edgeadapt.bench.parity import ParityLog, check_parity
from edgeadapt.bench.timing import Ratio, Stats
from edgeadapt.errors import ParityError
from edgeadapt.timer import flush_key, time_interleaved

#: the runtime mode each timed switch method runs in
METHOD_MODES = {"shira": "live", "lora-fuse": "live", "ort-adapter": "unfused"}


class Cycle:
    """One full switch per call, cycling through ``names``; remembers the last one applied so
    that an untimed check in between can put the runtime back (:meth:`restore`)."""

    def __init__(self, switch: Callable[[object], object], names: list) -> None:
        self.switch = switch
        self.names = list(names)
        self._it = itertools.cycle(self.names)
        self.last: object = None

    def __call__(self) -> None:
        self.last = next(self._it)
        self.switch(self.last)

    def restore(self) -> None:
        if self.last is not None:
            self.switch(self.last)


@dataclass
class SwitchResult:
    """One backend's switch rows, its memory row after the switches, and the live SHiRA
    switches with the copies timed right before them (the floor's inputs)."""

    rows: list[dict]
    memory: dict
    floor_round: fl.FloorRound


def switch_row(target: Target, method: str, mode: str, samples: dict[str, list[float]],
               case: str) -> dict:
    """The row of ``samples[case]``; ``ratio_vs_shira`` (p10, p90) = median over rounds of
    case / the live SHiRA switch timed in the same round (``samples["shira"]``)."""
    r = Ratio.of(samples, case, "shira")
    row = {**target.fields(), "method": method, "mode": mode,
           **Stats.of(samples[case]).as_dict(), "ratio_vs_shira": r.paired_median,
           "ratio_vs_shira_p10": r.paired_p10, "ratio_vs_shira_p90": r.paired_p90}
    if case != "shira":  # the SHiRA switch it was paired with, from the same rounds
        row["shira_same_rounds_p50_ms"] = Stats.of(samples["shira"]).p50_ms
    return row


def check_switch(parity: ParityLog, target: Target, method: str, mode: str, variant: str,
                 cycle: Cycle, adapters: list[str | None], run: Callable[[dict], np.ndarray],
                 to_base: Callable[[], object], base_out: np.ndarray | None) -> None:
    """After a timed switch series, before its timings are reported: switch to each adapter of
    the cycle (``cycle.names[i]`` is ``adapters[i]``) and compare one forward of the switched
    runtime with PyTorch carrying that adapter; then back to the base, which must match the
    base reference and, where the mode restores exactly (``base_out``: the same runtime's
    output before its first switch), be bit-identical to it. ParityError otherwise. The
    runtime is left as the series left it."""
    what = f"{target.key} {method} switch ({mode})"
    x = parity.check_inputs
    for arg, name in zip(cycle.names, adapters, strict=True):
        cycle.switch(arg)
        err = check_parity(run(x), parity.check_reference(name), f"{what} to {name}")
        parity.row(target, variant, x, err, check="switch", method=method, mode=mode,
                   adapter=name)
    to_base()
    got = run(x)
    err = check_parity(got, parity.check_reference(None), f"{what} back to the base")
    exact = None
    if base_out is not None:
        exact = bool(np.array_equal(got, base_out))
        if not exact:
            raise ParityError(
                f"{what}: switching back to the base is not bit-exact (max |diff| "
                f"{float(np.max(np.abs(got - base_out))):.3g} against the same runtime's "
                "output before its first switch); refusing to report its timings")
    parity.row(target, variant, x, err, check="restore", method=method, mode=mode,
               adapter=None, bit_exact=exact)
    cycle.restore()


def _reload(ctx: BenchContext, target: Target) -> object:
    return load_runtime(ctx, target, reload_mode(target), adapters=False, verify_base=False)


def _check_reload(ctx: BenchContext, target: Target, parity: ParityLog) -> None:
    """A reloaded runtime (what the timed reload builds) against the base reference."""
    rt = _reload(ctx, target)
    mode = reload_mode(target)
    err = check_parity(rt.store.run(parity.check_inputs), parity.check_reference(None),
                       f"{target.key} reload ({mode})")
    parity.row(target, "base", parity.check_inputs, err, check="reload", method="reload",
               mode=mode, adapter=None)
    del rt
    gc.collect()


def time_switches(ctx: BenchContext, target: Target, rts: SwitchRuntimes, parity: ParityLog,
                  probe: fl.CopyProbe) -> SwitchResult:
    """Both series of ``target`` (see the module docstring), each checked before reporting."""
    opts, aset = ctx.opts, ctx.adapters
    shira, lora = aset.of("shira")[:2], aset.of("lora")[:2]
    fast = {"shira": Cycle(rts.live.switch, shira), "lora-fuse": Cycle(rts.lora.switch, lora)}
    peer = rts.ort_peer
    if peer is not None:
        loaded = [peer.session.load(f) for f in peer.files]
        fast["ort-adapter"] = Cycle(peer.session.activate, loaded)
    samples = time_interleaved(fast, repeats=opts.switch_repeats, warmup=opts.warmup,
                               progress=ctx.progress, flush=probe)
    check_switch(parity, target, "shira", "live", "shira-live", fast["shira"], shira,
                 rts.live.store.run, lambda: rts.live.switch(None), rts.base_out["live"])
    check_switch(parity, target, "lora-fuse", "live", "lora-fused", fast["lora-fuse"], lora,
                 rts.lora.store.run, lambda: rts.lora.switch(None), rts.base_out["lora"])
    if peer is not None:  # no exact restore to check: the base is the graph's zero branch
        check_switch(parity, target, "ort-adapter", "unfused", "ort-lora-adapter",
                     fast["ort-adapter"], peer.adapter_names, peer.session.run,
                     lambda: peer.session.activate(None), None)
    live_buffers = rts.live.store.live_weights()
    floor_round = fl.FloorRound(
        switch_ms=samples["shira"], bandwidth=probe.bandwidth(samples[flush_key("shira")]),
        layouts={n: lw.layout for n, lw in live_buffers.items()},
        offsets={n: int(lw.array.ctypes.data) % fl.CACHE_LINE
                 for n, lw in live_buffers.items()})
    rows = [switch_row(target, m, METHOD_MODES[m], samples, m) for m in fast]
    memory = {**target.fields(), "runtime": "live after switches",
              "restore_bytes_shira": rts.live.restore_memory_bytes(),
              "plan_cache_bytes_shira": rts.live.plan_cache_bytes(),
              # ExecuTorch: live buffers moved to huge pages at load (runtime pages.py)
              "collapsed_bytes": rts.live.store.collapsed_bytes,
              "restore_bytes_lora": rts.lora.restore_memory_bytes()}
    slow: dict[str, Callable[[], object]] = {
        "shira": fast["shira"], "reload": lambda: _reload(ctx, target)}
    repack = rts.repack
    if repack is not None:
        slow["shira-repack"] = repack_cycle = Cycle(repack.switch, shira)
    samples = time_interleaved(slow, repeats=opts.reload_repeats, warmup=1,
                               progress=ctx.progress, flush=probe)
    if repack is not None:
        check_switch(parity, target, "shira", "repack", "shira-repack", repack_cycle, shira,
                     repack.store.run, lambda: repack.switch(None), rts.base_out["repack"])
    _check_reload(ctx, target, parity)
    rows.append(switch_row(target, "reload", reload_mode(target), samples, "reload"))
    if "shira-repack" in samples:
        rows.append(switch_row(target, "shira", "repack", samples, "shira-repack"))
    return SwitchResult(rows, memory, floor_round)
