"""Where live weights sit in memory: huge pages under the buffers a SHiRA switch scatters into.

A switch touches about a quarter of the live weights' cache lines, scattered; on 4 KB pages most
of those writes also miss the TLB. Two ways to get 2 MiB pages under the live buffers (numpy
only, no torch):

- :func:`arena_copies` for buffers we allocate (ONNX Runtime's live inputs): one allocation,
  which numpy backs with transparent huge pages;
- :func:`collapse_to_huge_pages` for buffers a runtime allocates (ExecuTorch's planned memory):
  ``madvise(MADV_COLLAPSE)`` after loading.

Measured (docs/bench.md): switches 5-7% faster on both backends in same-session A/B runs.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping

import numpy as np

#: start of every array carved by :func:`arena_copies`: a 64-byte cache line
ARENA_ALIGN_BYTES = 64


def arena_copies(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Writable C-contiguous copies of ``arrays`` (float32, or their own dtype where it is
    int8 or uint8: quantized codes, packed int4 codes), those of one dtype carved from one
    allocation, each starting on a 64-byte boundary.

    Why: numpy asks the kernel to back an allocation of >= 4 MiB with transparent huge pages
    (``madvise``); 60 separate 0.4-1.3 MB live-weight buffers get 4 KB pages. A SHiRA switch
    touches about a quarter of the live weights' cache lines, scattered, so on 4 KB pages most
    writes also miss the TLB: on SmolLM2 q/v the benchmark's switch is 6-7% faster with the
    arena than with ``NUMPY_MADVISE_HUGEPAGE=0`` (docs/bench.md, ONNX Runtime run 6).
    """
    kinds: dict[np.dtype, list[str]] = {}
    for name, a in arrays.items():
        dt = a.dtype if a.dtype in (np.int8, np.uint8) else np.dtype(np.float32)
        kinds.setdefault(dt, []).append(name)
    out = {}
    for dt, names in kinds.items():
        step = ARENA_ALIGN_BYTES // dt.itemsize
        offsets, total = {}, 0
        for name in names:
            offsets[name] = total
            total += -(-int(arrays[name].size) // step) * step
        arena = np.empty(total + step, dtype=dt)
        shift = (-(arena.ctypes.data // dt.itemsize)) % step  # numpy aligns to 16 bytes
        for name in names:
            a = arrays[name]
            view = arena[shift + offsets[name]:shift + offsets[name] + a.size].reshape(a.shape)
            np.copyto(view, a, casting="same_kind")
            out[name] = view
    return {name: out[name] for name in arrays}


def one_span(arrays: Mapping[str, np.ndarray]) -> tuple[np.ndarray, dict[str, int]] | None:
    """One flat writable view over the memory of ``arrays`` and each array's element offset in
    it, when they lie back to back in one block of memory (C-contiguous, one dtype, at most
    :data:`ARENA_ALIGN_BYTES` of padding between neighbours: :func:`arena_copies`, ExecuTorch's
    planned buffers); None otherwise.

    Why: a cached switch then writes every weight with one scatter, ``span[off_w + U_w] = v``,
    instead of one numpy call per weight (2-6% of a SmolLM2 q/v switch; docs/bench.md). The view
    does not own the memory: whoever holds it must keep the arrays (and their owners) alive.
    """
    items = sorted(((a.ctypes.data, name, a) for name, a in arrays.items() if a.size),
                   key=lambda t: t[0])
    if not items:
        return None
    dtype = items[0][2].dtype
    start, end = items[0][0], items[0][0]
    offsets = dict.fromkeys(arrays, 0)  # empty arrays: never written
    for ptr, name, a in items:
        if a.dtype != dtype or not (a.flags.c_contiguous and a.flags.writeable) or \
                not end <= ptr <= end + ARENA_ALIGN_BYTES or (ptr - start) % dtype.itemsize:
            return None
        offsets[name] = (ptr - start) // dtype.itemsize
        end = ptr + a.nbytes
    memory = (ctypes.c_char * (end - start)).from_address(start)
    return np.frombuffer(memory, dtype=dtype), offsets


HUGE_PAGE = 2 << 20
MADV_COLLAPSE = 25  # Linux >= 6.1


def collapse_to_huge_pages(arrays: Mapping[str, np.ndarray]) -> int:
    """Ask the kernel to back the memory under ``arrays`` with huge pages now
    (``madvise(MADV_COLLAPSE)`` on every whole 2 MiB page inside their address ranges), for
    buffers we do not allocate ourselves (ExecuTorch's planned memory). Contents are unchanged.
    Returns the bytes collapsed; 0 where the call is unsupported (no Linux, kernel < 6.1) or
    refused — an optimisation only, never an error."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return 0
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    spans = sorted((a.ctypes.data, a.ctypes.data + a.nbytes) for a in arrays.values())
    merged: list[list[int]] = []
    for lo, hi in spans:
        if merged and lo <= merged[-1][1] + HUGE_PAGE:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    done = 0
    for lo, hi in merged:
        start = -(-lo // HUGE_PAGE) * HUGE_PAGE
        end = hi // HUGE_PAGE * HUGE_PAGE
        if end > start and madvise(start, end - start, MADV_COLLAPSE) == 0:
            done += end - start
    return done
