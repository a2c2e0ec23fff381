"""The switch scatter (edgeadapt.runtime.scatter) against numpy's fancy assignment."""

import numpy as np
import pytest

from edgeadapt.errors import ConfigError
from edgeadapt.format import nibbles
from edgeadapt.runtime import native
from edgeadapt.runtime import scatter as scatter_module
from edgeadapt.runtime.scatter import native_scatter, scatter

needs_native = pytest.mark.skipif(not native_scatter(), reason="no C++ compiler")


def _numpy_written(dst: np.ndarray, pos: np.ndarray, vals: np.ndarray,
                   packed: bool) -> np.ndarray:
    """A copy of ``dst`` with ``vals`` written at ``pos`` by numpy (``packed``: int4 codes
    two per byte, :func:`edgeadapt.format.nibbles.scatter`)."""
    want = dst.copy()
    if packed:
        nibbles.scatter(want, pos, vals)
    else:
        want[pos] = vals
    return want


@needs_native
@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.float16, np.float32, np.int64])
def test_native_scatter_writes_what_numpy_writes_bit_for_bit(dtype):
    rng = np.random.default_rng(1)
    n = 100_003  # odd length: no position lands on a round boundary by chance
    base = rng.integers(0, 255, n * np.dtype(dtype).itemsize, dtype=np.uint8).view(dtype)
    pos = np.sort(rng.choice(n, 4_097, replace=False)).astype(np.int64)
    pos[0], pos[-1] = 0, n - 1  # both ends of the buffer
    vals = rng.integers(0, 255, pos.size * np.dtype(dtype).itemsize,
                        dtype=np.uint8).view(dtype)
    got, want = base.copy(), base.copy()
    scatter(got, pos, vals)
    want[pos] = vals
    assert got.tobytes() == want.tobytes()
    assert got.tobytes() != base.tobytes()


@pytest.mark.parametrize("native", [True, False])
def test_positions_outside_the_buffer_are_refused_before_any_write(native):
    dst = np.arange(10, dtype=np.float32)
    for pos in ([3, 10], [-1, 4]):
        with pytest.raises(IndexError, match="outside"):
            scatter(dst, np.array(pos, np.int64), np.zeros(2, np.float32), native=native)
    assert np.array_equal(dst, np.arange(10, dtype=np.float32))


@needs_native
def test_unsorted_positions_past_the_range_check_are_skipped_and_reported():
    # the range check reads the first and last position only; the kernel never writes outside
    dst = np.zeros(8, np.float32)
    with pytest.raises(IndexError, match="1 positions outside"):
        scatter(dst, np.array([0, 99, 7], np.int64), np.ones(3, np.float32))
    assert dst.tobytes() == np.array([1, 0, 0, 0, 0, 0, 0, 1], np.float32).tobytes()


def test_arrays_the_kernel_does_not_take_go_through_numpy():
    rng = np.random.default_rng(2)
    dst = rng.standard_normal((6, 7)).astype(np.float32)
    view = dst.T.reshape(-1)  # a copy: checked below that scatter writes into what it is given
    pos = np.array([1, 5, 40], np.int64)
    scatter(view, pos, np.array([7.0, 8.0, 9.0], np.float64))  # other dtype: numpy casts
    assert view[[1, 5, 40]].tolist() == [7.0, 8.0, 9.0]
    strided = np.zeros(20, np.float32)[::2]
    scatter(strided, np.array([0, 9], np.int64), np.array([1.0, 2.0], np.float32))
    assert strided[[0, 9]].tolist() == [1.0, 2.0]


def test_where_the_kernel_cannot_be_built_numpy_writes(monkeypatch):
    """No compiler and nothing built: the library says so, ``native_scatter()`` is False (on
    every call: nothing is remembered beside the library) and scatter writes through numpy."""
    def no_compiler():
        raise ConfigError("the native switch scatter needs a C++ compiler")

    library = native.Library(no_compiler)
    monkeypatch.setattr(scatter_module, "_LIBRARY", library)
    assert not native_scatter() and not native_scatter()
    assert library.loaded is None and "C++ compiler" in library.unavailable()
    dst = np.zeros(6, np.float32)
    scatter(dst, np.array([1, 4], np.int64), np.array([2.0, 3.0], np.float32))
    assert dst.tolist() == [0, 2, 0, 0, 3, 0]


@pytest.mark.parametrize("native", [True, False])
def test_a_batch_writes_what_each_scatter_writes_every_time_it_is_called(native):
    """Several weights (fp32, int8 codes, int4 codes two per byte, one array the kernel does not
    take) written by one Batch equal numpy's per-weight writes, and calling it again after the
    arrays changed writes again (it reads them at each call)."""
    from edgeadapt.runtime.scatter import Batch

    rng = np.random.default_rng(3)
    writes, wants = [], []
    for dtype, n, packed in [(np.float32, 5_001, False), (np.int8, 3_003, False),
                             (np.uint8, 2_048, True), (np.float32, 777, False)]:
        dst = rng.integers(0, 255, n * np.dtype(dtype).itemsize, np.uint8).view(dtype)
        codes = 2 * n if packed else n
        pos = np.sort(rng.choice(codes, 301, replace=False)).astype(np.int64)
        vals = (rng.integers(-8, 8, pos.size).astype(np.int8) if packed else
                rng.integers(0, 255, pos.size * np.dtype(dtype).itemsize,
                             np.uint8).view(dtype))
        writes.append((dst, pos, vals, packed))
        wants.append(_numpy_written(dst, pos, vals, packed))
    writes[-1] = (writes[-1][0], writes[-1][1], writes[-1][2].astype(np.float64), False)
    bases = [w[0].copy() for w in writes]
    batch = Batch(writes)  # native where the kernel is built
    batch(native=native)  # native=False: every write through numpy (the engine's flag)
    for (dst, *_), want, base in zip(writes, wants, bases, strict=True):
        assert dst.tobytes() == want.tobytes() != base.tobytes()
    dst, pos, vals, _ = writes[0]
    vals[:] = 0.5  # the cached values change in place: the next call writes them
    batch(native=native)
    assert np.all(dst[pos] == 0.5)


def test_a_batch_refuses_positions_outside_a_buffer_before_any_write():
    from edgeadapt.runtime.scatter import Batch

    a, b = np.zeros(10, np.float32), np.zeros(4, np.uint8)
    with pytest.raises(IndexError, match="outside"):
        Batch([(a, np.array([1, 2], np.int64), np.ones(2, np.float32), False),
               (b, np.array([3, 8], np.int64), np.ones(2, np.int8), True)])  # 8 codes: 0..7
    assert not a.any() and not b.any()


@needs_native
@pytest.mark.parametrize("threads", [2, 3, 16])
def test_threads_write_what_numpy_writes(threads):
    """A scatter large enough to be shared between threads (the kernel's chunks are 16,384
    positions), fp32 and packed int4 codes, equals numpy's write. The codes' positions are
    dense runs offset from the chunk size, so chunk boundaries fall inside 32-code blocks
    (two codes per byte: a block split between two threads would race on its bytes)."""
    from edgeadapt.runtime.scatter import scatter_nibbles

    rng = np.random.default_rng(4)
    n = 1_000_003
    base = rng.standard_normal(n).astype(np.float32)
    pos = np.sort(rng.choice(n, 100_001, replace=False)).astype(np.int64)
    vals = rng.standard_normal(pos.size).astype(np.float32)
    want = base.copy()
    want[pos] = vals
    flat = rng.integers(0, 256, 40_000, dtype=np.uint8)
    cpos = np.unique(np.concatenate([np.arange(7, 60_007),
                                     rng.choice(2 * flat.size, 5_000, replace=False)]))
    codes = rng.integers(-8, 8, cpos.size).astype(np.int8)
    cwant = flat.copy()
    nibbles.scatter(cwant, cpos, codes)
    for _ in range(5):  # a race shows only now and then
        got, cgot = base.copy(), flat.copy()
        scatter(got, pos, vals, threads=threads)
        scatter_nibbles(cgot, cpos, codes, threads=threads)
        assert got.tobytes() == want.tobytes()
        np.testing.assert_array_equal(cgot, cwant)


@needs_native
def test_a_batch_on_threads_writes_what_numpy_writes():
    from edgeadapt.runtime.scatter import Batch

    rng = np.random.default_rng(5)
    writes, wants = [], []
    for n, m, packed in [(400_001, 40_000, False), (30_000, 50_011, True),
                         (5_000, 300, False)]:
        dst = (rng.integers(0, 256, n, dtype=np.uint8) if packed
               else rng.standard_normal(n).astype(np.float32))
        pos = np.sort(rng.choice(2 * n if packed else n, m, replace=False)).astype(np.int64)
        vals = (rng.integers(-8, 8, m).astype(np.int8) if packed
                else rng.standard_normal(m).astype(np.float32))
        writes.append((dst, pos, vals, packed))
        wants.append(_numpy_written(dst, pos, vals, packed))
    Batch(writes)(native=True, threads=2)
    for (dst, *_), want in zip(writes, wants, strict=True):
        assert dst.tobytes() == want.tobytes()


@needs_native
def test_no_32_code_block_of_packed_codes_is_split_between_threads():
    """The kernel's chunks (``edgeadapt_scatter_chunks``, what its threads take in turn): for
    int4 codes two per byte, each chunk starts at a new 32-code block (the bytes a block's
    codes share are written by one thread); other elements split at round chunk sizes."""
    import ctypes

    lib = scatter_module._LIBRARY.loaded[1]
    fn = lib.edgeadapt_scatter_chunks
    fn.restype = ctypes.c_int64
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    pos = np.concatenate([np.arange(7, 60_007), np.arange(70_000, 140_000, 3)]).astype(np.int64)
    for itemsize in (0, 4):
        starts = np.zeros(pos.size // 1000 + 2, np.int64)
        k = fn(pos.ctypes.data, pos.size, itemsize, starts.ctypes.data)
        starts = starts[:k]
        assert starts[0] == 0 and starts[-1] == pos.size and k > 4
        assert np.all(np.diff(starts) > 0)
        inner = starts[1:-1]
        if itemsize == 0:
            assert np.all(pos[inner] >> 5 != pos[inner - 1] >> 5)
            assert np.any(inner % 1024 != 0)  # some boundary had to move to a block start
        else:
            assert np.all(np.diff(starts)[:-1] == np.diff(starts)[0])
