"""The switch's scatter ``dst[pos] = vals``, in native code where a compiler is at hand.

A cached switch is one scatter of a few hundred thousand sorted positions into hundreds of MB
of weights (:mod:`edgeadapt.runtime.engine`): each store is a cache line fetched from memory.
numpy's fancy assignment issues them one by one; ``kernels/scatter.cpp`` prefetches the line
of ``pos[i + 32]`` while it stores ``pos[i]``, and ctypes releases the GIL for the call, so
Python threads (a decoding conversation's sampler) go on meanwhile. ``threads`` > 1 shares a
large scatter's positions, in chunks, between the calling thread and helpers started for the
call: each core keeps its own line fetches in flight (docs/runtime.md, "Native scatter").
Elements of 1, 2, 4 or 8 bytes are copied bit for bit. Without a C++ compiler (and nothing
built) numpy does it.
:func:`scatter_nibbles` writes int4 codes into a buffer that packs two per byte
(:mod:`edgeadapt.format.nibbles`), each a read-modify-write of its byte.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Callable

import numpy as np

from edgeadapt.format import nibbles
from edgeadapt.runtime import native

log = logging.getLogger(__name__)

SOURCE = native.KERNELS / "scatter.cpp"
#: ``edgeadapt_scatter(dst, n, pos, vals, m, itemsize, threads)`` -> positions skipped (ctypes
#: releases the GIL for the call)
_SIGNATURE = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                              ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64)
#: ``edgeadapt_scatter_nibbles(dst, n_codes, pos, codes, m, threads)`` -> positions skipped
_NIBBLES = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                            ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64)
#: ``edgeadapt_scatter_many(count, dsts, ns, poss, vals, ms, itemsize, threads)`` -> positions
#: skipped
_MANY = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                         ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                         ctypes.c_int64)


def _library_path():
    return native.build(SOURCE, "libedgeadapt_scatter.so", cflags=("-pthread",),
                        needed_for="the native switch scatter",
                        hint="; numpy's fancy assignment is used instead")


_LIBRARY = native.Library(_library_path)


def native_scatter() -> bool:
    """Whether :func:`scatter` runs native code (building and loading it on the first call)."""
    if _LIBRARY.loaded is not None:
        return True
    why = _LIBRARY.unavailable()
    if why is not None:
        log.debug("native scatter unavailable: %s", why)
    return why is None


@functools.cache
def _kernel(library: ctypes.CDLL) -> Callable[..., int]:
    """``edgeadapt_scatter`` of a loaded library with its C signature (bound once)."""
    return _SIGNATURE(("edgeadapt_scatter", library))


@functools.cache
def _nibble_kernel(library: ctypes.CDLL) -> Callable[..., int]:
    """``edgeadapt_scatter_nibbles`` of a loaded library with its C signature."""
    return _NIBBLES(("edgeadapt_scatter_nibbles", library))


@functools.cache
def _many_kernel(library: ctypes.CDLL) -> Callable[..., int]:
    """``edgeadapt_scatter_many`` of a loaded library with its C signature."""
    return _MANY(("edgeadapt_scatter_many", library))


def _takes(dst: np.ndarray, pos: np.ndarray, vals: np.ndarray) -> bool:
    """Whether the native :func:`scatter` takes these arrays."""
    return (dst.ndim == 1 and dst.flags.c_contiguous and dst.flags.writeable
            and pos.dtype == np.int64 and pos.flags.c_contiguous and vals.dtype == dst.dtype
            and vals.flags.c_contiguous and vals.shape == pos.shape
            and dst.itemsize in (1, 2, 4, 8))


def _takes_nibbles(dst: np.ndarray, pos: np.ndarray, codes: np.ndarray) -> bool:
    """Whether the native :func:`scatter_nibbles` takes these arrays."""
    return (dst.ndim == 1 and dst.dtype == np.uint8 and dst.flags.c_contiguous
            and dst.flags.writeable and pos.dtype == np.int64 and pos.flags.c_contiguous
            and codes.dtype == np.int8 and codes.flags.c_contiguous
            and codes.shape == pos.shape)


def _check_range(pos: np.ndarray, n: int) -> None:
    if pos[0] < 0 or pos[-1] >= n:
        raise IndexError(f"scatter positions {int(pos[0])}..{int(pos[-1])} outside a buffer of "
                         f"{n} elements")


def scatter(dst: np.ndarray, pos: np.ndarray, vals: np.ndarray, native: bool = True,
            threads: int = 1) -> None:
    """``dst[pos] = vals`` for a 1-D ``dst`` and int64 ``pos`` sorted ascending.

    IndexError (nothing written) if a position lies outside ``dst``. ``native=False``, or
    arrays the kernel does not take (non-contiguous, other dtypes, unusual item sizes), use
    numpy's fancy assignment, with the same result. ``threads``: how many threads the native
    kernel may write with (module docstring).
    """
    if pos.size == 0:
        return
    _check_range(pos, dst.shape[0])
    if native and _takes(dst, pos, vals) and native_scatter():
        kernel = _kernel(_LIBRARY.loaded[1])
        skipped = kernel(dst.ctypes.data, dst.shape[0], pos.ctypes.data, vals.ctypes.data,
                         pos.size, dst.itemsize, threads)
        if skipped:  # only an unsorted ``pos`` gets past the range check above
            raise IndexError(f"scatter: {skipped} positions outside the buffer were skipped "
                             "(positions must be sorted)")
        return
    dst[pos] = vals


def scatter_nibbles(dst: np.ndarray, pos: np.ndarray, codes: np.ndarray,
                    native: bool = True, threads: int = 1) -> None:
    """Write int8 ``codes`` (in [-8, 7]) at code positions ``pos`` (int64, sorted ascending,
    distinct) of a 1-D uint8 buffer packing two codes per byte (:mod:`edgeadapt.format.nibbles`;
    it holds ``2 * dst.size`` codes). IndexError (nothing written) for a position outside it;
    ``native=False`` or arrays the kernel does not take: numpy, with the same result;
    ``threads`` as for :func:`scatter`."""
    if pos.size == 0:
        return
    _check_range(pos, 2 * dst.shape[0])
    if native and _takes_nibbles(dst, pos, codes) and native_scatter():
        skipped = _nibble_kernel(_LIBRARY.loaded[1])(dst.ctypes.data, 2 * dst.shape[0],
                                                     pos.ctypes.data, codes.ctypes.data, pos.size,
                                                     threads)
        if skipped:
            raise IndexError(f"scatter: {skipped} positions outside the buffer were skipped "
                             "(positions must be sorted)")
        return
    nibbles.scatter(dst, pos, codes)


#: one write of a :class:`Batch`: (scatter or scatter_nibbles, dst, pos, vals)
_Write = tuple[Callable[..., None], np.ndarray, np.ndarray, np.ndarray]


class Batch:
    """Scatters written together again and again (the weights of a cached switch that do not
    lie in one span of memory): ``(dst, pos, vals, packed)`` each as :func:`scatter`
    (``packed``: :func:`scatter_nibbles`), checked once here (IndexError for a position outside
    its buffer). Calling the batch writes them all: those the native kernel takes in one call
    per element kind (``edgeadapt_scatter_many``, the GIL released, on up to ``threads``
    threads), the others one by one (``batch(native=False)``: every one through numpy). It
    keeps the arrays alive and reads them at each call, so they must keep their memory (the
    engine's cached plans do)."""

    def __init__(self, writes: list[tuple[np.ndarray, np.ndarray, np.ndarray, bool]]) -> None:
        self._every: list[_Write] = []  # all of them, as numpy writes them
        self._rest: list[_Write] = []  # those the native kernel does not take
        kinds: dict[int, list[tuple[np.ndarray, int, np.ndarray, np.ndarray]]] = {}
        for dst, pos, vals, packed in writes:
            if pos.size == 0:
                continue
            n = dst.shape[0] * (nibbles.PER_BYTE if packed else 1)
            _check_range(pos, n)
            write = (scatter_nibbles if packed else scatter, dst, pos, vals)
            self._every.append(write)
            if (_takes_nibbles if packed else _takes)(dst, pos, vals) and native_scatter():
                kinds.setdefault(0 if packed else dst.itemsize, []).append((dst, n, pos, vals))
            else:
                self._rest.append(write)
        # per element kind: (itemsize, count, (pointers of dst / pos / vals, n, m)); the
        # arrays the pointers address stay alive in self._every
        self._calls = []
        for itemsize, items in kinds.items():
            table = (np.array([[a.ctypes.data for a in (d, p, v)] for d, _, p, v in items],
                              np.uint64).T.copy(),
                     np.array([n for _, n, _, _ in items], np.int64),
                     np.array([p.size for _, _, p, _ in items], np.int64))
            self._calls.append((itemsize, len(items), table))

    def __call__(self, native: bool = True, threads: int = 1) -> None:
        if not native:
            for fn, dst, pos, vals in self._every:
                fn(dst, pos, vals, False)
            return
        for itemsize, count, (ptrs, ns, ms) in self._calls:
            skipped = _many_kernel(_LIBRARY.loaded[1])(
                count, ptrs[0].ctypes.data, ns.ctypes.data, ptrs[1].ctypes.data,
                ptrs[2].ctypes.data, ms.ctypes.data, itemsize, threads)
            if skipped:
                raise IndexError(f"scatter: {skipped} positions outside the buffers were "
                                 "skipped (positions must be sorted)")
        for fn, dst, pos, vals in self._rest:
            fn(dst, pos, vals, False)
