"""The memory-traffic floor of a SHiRA switch: the least time any implementation could take.

A full switch from adapter ``old`` to adapter ``new`` (both SHiRA, on the same base) must, for
each target weight W of ``itemsize`` bytes per element:

- bring every 64-byte cache line of W holding a position of ``old`` or ``new`` into the core and
  write it back: ``2 * 64 * lines`` bytes;
- read the positions of both adapters (``idx_bytes`` each), the values of ``new``
  (``value_bytes`` each) and the saved base values of every touched position (``itemsize`` each).

The floor is that byte count divided by the memory bandwidth measured in the same run with a
large ``numpy.copyto`` (counted as bytes read + bytes written). Scattered lines are fetched one
by one, without the hardware prefetch a stream enjoys, so a real switch sits above the floor;
the measured/floor ratio is how much headroom is left.

The benchmark times the copy as one more case interleaved with the switches
(:class:`CopyProbe`), so both see the same machine state (the copy also leaves the cache cold
for whatever follows it, as inference between two switches does), and :func:`floor_ratios`
pairs them round by round like every other ratio: ``floor_r = bytes / bw_r`` with
``bw_r = 2 * nbytes / t_copy_r``, and measured/floor = median_r(t_switch_r / floor_r). The
ratio against the best copy of the run (the peak bandwidth, the most pessimistic floor) is
reported too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from edgeadapt.errors import ConfigError
from edgeadapt.format import nibbles
from edgeadapt.format.layout import backend_index
from edgeadapt.timer import time_calls

CACHE_LINE = 64


def touched_lines(positions: np.ndarray, itemsize: int, line: int = CACHE_LINE,
                  offset: int = 0) -> int:
    """Number of distinct ``line``-byte cache lines holding the given flat element positions of
    a buffer with ``itemsize``-byte elements whose first byte sits ``offset`` bytes past a line
    boundary (``address % line``; 0 for a line-aligned buffer)."""
    pos = np.asarray(positions, dtype=np.int64)
    if pos.size == 0:
        return 0
    return int(np.unique((int(offset) % line + pos * itemsize) // line).size)


@dataclass(frozen=True)
class SwitchTraffic:
    """Bytes a full SHiRA switch must move (see the module docstring), split by kind."""

    lines: int
    line_bytes: int
    stream_bytes: int
    positions: int

    @property
    def total_bytes(self) -> int:
        return self.line_bytes + self.stream_bytes

    def as_dict(self) -> dict[str, int]:
        return {"cache_lines": self.lines, "line_bytes": self.line_bytes,
                "stream_bytes": self.stream_bytes, "total_bytes": self.total_bytes,
                "positions": self.positions}


def switch_traffic(
    old: Mapping[str, np.ndarray],
    new: Mapping[str, np.ndarray],
    shapes: Mapping[str, tuple[int, int]],
    *,
    layouts: Mapping[str, str] | None = None,
    offsets: Mapping[str, int] | None = None,
    itemsize: int = 4,
    idx_bytes: int = 8,
    value_bytes: int = 4,
    packed: frozenset[str] = frozenset(),
) -> SwitchTraffic:
    """Traffic of a full switch from ``old`` to ``new``.

    old, new: target weight name -> (K,) flat torch-layout indices (an empty mapping = base).
    shapes: name -> (out, in).  layouts: name -> ``as-is`` | ``transposed`` | ``blocked32``
    (default as-is). offsets: name -> the live buffer's address modulo 64 where the arrays
    are at hand (ExecuTorch's planned buffers sit at 32 past a line, not on one); default 0.
    packed: the weights whose int4 codes lie two per byte (:mod:`edgeadapt.format.nibbles`,
    blocked32): their positions are mapped to the bytes holding them (``itemsize`` 1).
    """
    lines = 0
    stream = 0
    positions = 0
    for name in sorted(set(old) | set(new)):
        layout = (layouts or {}).get(name, "as-is")
        a = np.asarray(old.get(name, np.empty(0, np.int64)), dtype=np.int64)
        b = np.asarray(new.get(name, np.empty(0, np.int64)), dtype=np.int64)
        union = np.union1d(a, b)
        at = backend_index(union, shapes[name], layout)
        lines += touched_lines(nibbles.byte_of(at) if name in packed else at, itemsize,
                               offset=(offsets or {}).get(name, 0))
        stream += (a.size + b.size) * idx_bytes + b.size * value_bytes + union.size * itemsize
        positions += int(union.size)
    return SwitchTraffic(lines, 2 * CACHE_LINE * lines, stream, positions)


def measure_bandwidth(nbytes: int = 128 << 20, repeats: int = 5,
                      clock: Callable[[], float] = time.perf_counter) -> float:
    """Memory bandwidth in bytes/s: ``2 * nbytes / t`` for the fastest of ``repeats`` copies of an
    ``nbytes`` float32 array (read + write), large enough to miss every cache. ``clock``: seconds
    (read before and after each timed copy; tests pass a fake one)."""
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    # one untimed copy (warm-up) faults the pages in before timing
    times_ms = time_calls(lambda: np.copyto(dst, src), repeats=repeats, warmup=1,
                          clock=lambda: clock() * 1e9)
    return 2.0 * src.nbytes / (min(times_ms) / 1e3)


class CopyProbe:
    """A zero-argument callable copying an ``nbytes`` float32 array (pages faulted in at
    construction), to be timed among the switches; ``bandwidth(t_ms) = 2 * nbytes / t``."""

    def __init__(self, nbytes: int = 128 << 20) -> None:
        self.src = np.ones(nbytes // 4, dtype=np.float32)
        self.dst = np.empty_like(self.src)
        np.copyto(self.dst, self.src)
        self.nbytes = int(self.src.nbytes)

    def __call__(self) -> None:
        np.copyto(self.dst, self.src)

    def bandwidth(self, copy_ms: np.ndarray | list[float]) -> np.ndarray:
        """Bytes/s of each timed copy (read + write)."""
        t = np.asarray(copy_ms, dtype=np.float64) / 1e3
        if t.size == 0 or np.any(t <= 0.0):
            raise ConfigError("copy timings must be positive")
        return 2.0 * self.nbytes / t


def floor_ratios(switch_ms: list[float], bandwidth: np.ndarray, traffic: SwitchTraffic
                 ) -> dict[str, float]:
    """The floor and measured/floor from switches and copies timed in the same rounds.

    switch_ms, bandwidth: (n,) per round. Returns floor_ms (at the median bandwidth),
    floor_ms_peak (at the highest), bandwidth_GBps (median), bandwidth_GBps_peak,
    measured_over_floor = median_r(switch_r * bw_r / bytes) (paired, the target's ratio) and
    measured_over_floor_peak = median(switch) / floor_ms_peak.
    """
    sw = np.asarray(switch_ms, dtype=np.float64)
    bw = np.asarray(bandwidth, dtype=np.float64)
    if sw.shape != bw.shape or sw.size == 0:
        raise ConfigError(f"floor ratios need one copy per switch round; got {sw.shape}, "
                          f"{bw.shape}")
    per_round = traffic.total_bytes / bw * 1e3
    peak = float(traffic.total_bytes / bw.max() * 1e3)
    return {"floor_ms": float(traffic.total_bytes / np.median(bw) * 1e3),
            "floor_ms_peak": peak, "bandwidth_GBps": float(np.median(bw) / 1e9),
            "bandwidth_GBps_peak": float(bw.max() / 1e9),
            "measured_over_floor": float(np.median(sw / per_round)),
            "measured_over_floor_peak": float(np.median(sw) / peak)}


def floor_ms(traffic: SwitchTraffic, bandwidth_bytes_per_s: float) -> float:
    """The floor in ms: total bytes over bandwidth."""
    if bandwidth_bytes_per_s <= 0.0:
        raise ConfigError("bandwidth must be positive")
    return traffic.total_bytes / bandwidth_bytes_per_s * 1e3


@dataclass(frozen=True)
class FloorRound:
    """One backend's timed live SHiRA switches and what their floor depends on.

    switch_ms, bandwidth: (n,) per round (ms; bytes/s of the copy timed right before each
    switch). layouts: weight -> the live buffer's layout; offsets: weight -> its address % 64.
    """

    switch_ms: list[float]
    bandwidth: np.ndarray
    layouts: dict[str, str]
    offsets: dict[str, int]


def floor_section(old: Mapping[str, np.ndarray], new: Mapping[str, np.ndarray],
                  shapes: Mapping[str, tuple[int, int]], rounds: Mapping[str, FloorRound],
                  default_layouts: Mapping[str, str]) -> dict:
    """The report's ``floor``: the floor of the timed switch from SHiRA adapter ``old`` to
    ``new`` (weight -> flat torch indices), in the layouts each backend's live buffers really
    have, counted from the buffers' real addresses, over the copy bandwidth timed right before
    each switch of the same rounds, per backend (``per_backend``, keyed as ``rounds``). The top
    level is the first timed backend's; where no backend timed a switch, ``default_layouts``
    (the bundle's ONNX layouts) and a standalone bandwidth measurement (best of 5 copies)."""

    def traffic(layouts: Mapping[str, str], offsets: Mapping[str, int] | None = None
                ) -> SwitchTraffic:
        return switch_traffic(old, new, shapes, layouts=layouts, offsets=offsets)

    traffics = {be: traffic(r.layouts, r.offsets) for be, r in rounds.items()}
    per_backend = {be: {**floor_ratios(r.switch_ms, r.bandwidth, traffics[be]),
                        **traffics[be].as_dict(), "layouts": sorted(set(r.layouts.values())),
                        "buffer_offsets": sorted(set(r.offsets.values()))}
                   for be, r in rounds.items()}
    if rounds:
        first, r = next(iter(rounds.items()))
        top, bw, source = traffics[first], float(np.median(r.bandwidth)), first
    else:
        top, bw, source = traffic(default_layouts), measure_bandwidth(), "onnx layouts"
    return {"shira_switch_ms": floor_ms(top, bw), "bandwidth_GBps": bw / 1e9,
            "layout": source, "per_backend": per_backend,
            "measured_over_floor": {be: v["measured_over_floor"]
                                    for be, v in per_backend.items()},
            **top.as_dict()}
