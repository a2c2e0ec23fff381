"""The switch scatter (edgeadapt.runtime.scatter) against numpy's fancy assignment."""

import numpy as np
import pytest

from edgeadapt.errors import ConfigError
from edgeadapt.runtime import native
from edgeadapt.runtime import scatter as scatter_module
from edgeadapt.runtime.scatter import native_scatter, scatter

needs_native = pytest.mark.skipif(not native_scatter(), reason="no C++ compiler")


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
    from edgeadapt.format import nibbles
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
        want = dst.copy()
        if packed:
            nibbles.scatter(want, pos, vals)
        else:
            want[pos] = vals
        writes.append((dst, pos, vals, packed))
        wants.append(want)
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
