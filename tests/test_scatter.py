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
