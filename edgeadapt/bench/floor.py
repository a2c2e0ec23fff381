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
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from edgeadapt.errors import ConfigError

CACHE_LINE = 64


def backend_positions(indices: np.ndarray, shape: tuple[int, int], layout: str) -> np.ndarray:
    """Flat positions in the backend buffer of torch-layout flat ``indices`` into an (out, in)
    weight: ``as-is`` keeps them; ``transposed`` (buffer holds W.T, shape (in, out)) maps
    i = r * in + c to c * out + r."""
    idx = np.asarray(indices, dtype=np.int64)
    if layout == "as-is":
        return idx
    if layout == "transposed":
        out, inn = shape
        return (idx % inn) * out + idx // inn
    raise ConfigError(f"unknown weight layout {layout!r}: use 'as-is' or 'transposed'")


def touched_lines(positions: np.ndarray, itemsize: int, line: int = CACHE_LINE) -> int:
    """Number of distinct ``line``-byte cache lines holding the given flat element positions of
    a line-aligned buffer with ``itemsize``-byte elements."""
    pos = np.asarray(positions, dtype=np.int64)
    if pos.size == 0:
        return 0
    return int(np.unique(pos * itemsize // line).size)


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
    itemsize: int = 4,
    idx_bytes: int = 8,
    value_bytes: int = 4,
) -> SwitchTraffic:
    """Traffic of a full switch from ``old`` to ``new``.

    old, new: target weight name -> (K,) flat torch-layout indices (an empty mapping = base).
    shapes: name -> (out, in).  layouts: name -> ``as-is`` | ``transposed`` (default as-is).
    """
    lines = 0
    stream = 0
    positions = 0
    for name in sorted(set(old) | set(new)):
        layout = (layouts or {}).get(name, "as-is")
        a = np.asarray(old.get(name, np.empty(0, np.int64)), dtype=np.int64)
        b = np.asarray(new.get(name, np.empty(0, np.int64)), dtype=np.int64)
        union = np.union1d(a, b)
        lines += touched_lines(backend_positions(union, shapes[name], layout), itemsize)
        stream += (a.size + b.size) * idx_bytes + b.size * value_bytes + union.size * itemsize
        positions += int(union.size)
    return SwitchTraffic(lines, 2 * CACHE_LINE * lines, stream, positions)


def measure_bandwidth(nbytes: int = 128 << 20, repeats: int = 5) -> float:
    """Memory bandwidth in bytes/s: ``2 * nbytes / t`` for the fastest of ``repeats`` copies of an
    ``nbytes`` float32 array (read + write), large enough to miss every cache."""
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in before timing
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * src.nbytes / best


def floor_ms(traffic: SwitchTraffic, bandwidth_bytes_per_s: float) -> float:
    """The floor in ms: total bytes over bandwidth."""
    if bandwidth_bytes_per_s <= 0.0:
        raise ConfigError("bandwidth must be positive")
    return traffic.total_bytes / bandwidth_bytes_per_s * 1e3
