"""edgeadapt's ExecuTorch runner (``edgeadapt/runtime/kernels/et_runner.cpp``) from Python:
programs loaded and their methods run by native code called through ctypes, which releases the
GIL for the whole call (numpy only, no torch), except the microsecond hold and release of a
switch (``_HOLD``).

ExecuTorch's Python runtime holds the GIL for a whole ``Method.execute``, so any Python thread
(a switch scattering adapter values, another conversation's sampler) waits for the run. The
runner does what the pybindings do (one set of planned arenas per program shared by its
methods, one loaded method per name, inputs through ``Method::set_input``, outputs copied out)
with the GIL released; runs of one program take the program's mutex (its methods share the
arenas), runs of different programs overlap.

    program = RunnerProgram(path)            # or the program's bytes (copied)
    forward = program.method("forward")      # loaded once; loading (re)initialises buffers
    logits, = forward.execute([ids])         # contiguous numpy arrays in, new arrays out
    view = forward.attribute("b_q_weight")   # writable, aliasing the planned mutable buffer

It registers nothing: kernels and backends come from ExecuTorch's registries in
``libexecutorch.so``, which the executorch pybindings fill when imported (XNNPACK, the
optimized kernels; edgeadapt's own kernel library registers into the same registry,
:mod:`.kernel`), so a program is opened after importing them. Built once per machine against
the executorch wheel (:func:`.kernel.build_against_executorch`); :func:`unavailable` says why
it cannot be used here (no C++ compiler and nothing built, a failed build).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from edgeadapt.errors import BundleError
from edgeadapt.runtime import native
from edgeadapt.runtime.backends.executorch.kernel import build_against_executorch

SOURCE = native.KERNELS / "et_runner.cpp"
NEEDED_FOR = "edgeadapt's ExecuTorch runner"
HINT = "; ExecuTorch's Python runtime runs the programs instead (holding the GIL per run)"
MAX_DIM = 16  # et_runner.cpp's MAX_DIM

#: ExecuTorch ScalarType codes of the dtypes that cross the runner's C ABI
SCALAR_TYPES = {np.dtype(np.uint8): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2,
                np.dtype(np.int32): 3, np.dtype(np.int64): 4, np.dtype(np.float16): 5,
                np.dtype(np.float32): 6, np.dtype(np.float64): 7, np.dtype(np.bool_): 11}
DTYPES = {code: dtype for dtype, code in SCALAR_TYPES.items()}


def _library_path() -> Path:
    return build_against_executorch(SOURCE, "libet_runner.so", needed_for=NEEDED_FOR,
                                    hint=HINT)


_LIBRARY = native.Library(_library_path)
_LIB: list[ctypes.CDLL] = []  # the library with its signatures declared, once loaded
#: et_runner_hold called with the GIL kept (ctypes.PyDLL), once loaded: a hold or release takes
#: microseconds, and a call that released the GIL would have to take it back from whichever
#: Python thread got it meanwhile (a decoding conversation), which can cost the switch a time
#: slice while the voided run still has the cores
_HOLD: list[Callable[..., int]] = []


def unavailable() -> str | None:
    """Why the runner cannot be used in this process, or None once it is loaded (built first
    if needed)."""
    if _LIB:
        return None
    why = _LIBRARY.unavailable()
    if why is not None:
        return why
    lib = _LIBRARY.loaded[1]
    p, i32, i64 = ctypes.c_void_p, ctypes.POINTER(ctypes.c_int32), ctypes.POINTER(ctypes.c_int64)
    signatures = {
        "et_runner_error": (ctypes.c_char_p, []),
        "et_runner_open_file": (p, [ctypes.c_char_p]),
        "et_runner_open_buffer": (p, [p, ctypes.c_size_t, ctypes.c_char_p]),
        "et_runner_close": (None, [p]),
        "et_runner_hold": (ctypes.c_int, [p, ctypes.c_int]),
        "et_runner_load_method": (ctypes.c_int, [p, ctypes.c_char_p]),
        "et_runner_attribute": (ctypes.c_int, [p, ctypes.c_int, ctypes.c_char_p,
                                               ctypes.POINTER(p), i32, i32, i64, ctypes.c_int32]),
        "et_runner_execute": (ctypes.c_int, [p, ctypes.c_int, ctypes.c_int, p, p, p, p]),
        "et_runner_output": (ctypes.c_int, [ctypes.c_int, i32, i32, i64, i64]),
        "et_runner_take_outputs": (ctypes.c_int, [ctypes.c_int, p]),
        "et_runner_release_outputs": (None, []),
    }
    for name, (restype, argtypes) in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    hold = ctypes.PyDLL(lib._name, handle=lib._handle).et_runner_hold
    hold.restype, hold.argtypes = signatures["et_runner_hold"]
    _HOLD[:] = [hold]
    _LIB[:] = [lib]
    return None


def _lib() -> ctypes.CDLL:
    why = unavailable()
    if why is not None:
        raise BundleError(f"{NEEDED_FOR} cannot be loaded: {why}")
    return _LIB[0]


def _registries() -> None:
    """Fill ExecuTorch's registries as its Python runtime does: importing the pybindings loads
    the libraries that register the XNNPACK backend and the optimized kernels (imports torch)."""
    import executorch.extension.pybindings.portable_lib  # noqa: F401


def _error(what: str) -> BundleError:
    """The runner's message for the failed call (kept per thread) as a BundleError."""
    return BundleError(f"{what}: {_LIB[0].et_runner_error().decode(errors='replace')}")


class _Memory:
    """Memory of a loaded program seen as a numpy array base: keeps the program alive while
    any array aliasing its buffers is."""

    def __init__(self, owner: RunnerProgram, address: int, nbytes: int) -> None:
        self.owner = owner
        self.__array_interface__ = {"data": (address, False), "shape": (nbytes,),
                                    "typestr": "|u1", "version": 3}


class RunnerMethod:
    """A loaded method of a :class:`RunnerProgram`."""

    def __init__(self, program: RunnerProgram, name: str, index: int) -> None:
        self.program, self.name, self._index = program, name, index

    def execute(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The outputs of one run (new arrays) on ``inputs``: C-contiguous arrays of the dtypes
        and shapes the method takes, read in place (aliased where the program does not plan
        the input, copied into its planned input otherwise), never written. BundleError where
        the method refuses them or fails."""
        lib, n = _lib(), len(inputs)
        arrays = [np.ascontiguousarray(a) for a in inputs]  # no copy for contiguous arrays
        for i, a in enumerate(arrays):
            if a.dtype not in SCALAR_TYPES or a.ndim > MAX_DIM:
                raise BundleError(f"{self.name}: input {i} is {a.dtype} of {a.ndim} dimensions;"
                                  " the runner takes numeric arrays of at most 16")
        dtypes = np.array([SCALAR_TYPES[a.dtype] for a in arrays], np.int32)
        ndims = np.array([a.ndim for a in arrays], np.int32)
        sizes = np.array([s for a in arrays for s in a.shape] or [0], np.int64)
        data = (ctypes.c_void_p * max(n, 1))(*[a.ctypes.data for a in arrays])
        count = lib.et_runner_execute(self.program._handle, self._index, n,
                                      dtypes.ctypes.data, ndims.ctypes.data, sizes.ctypes.data,
                                      data)
        if count < 0:
            raise _error(f"ExecuTorch method {self.name!r}")
        # the outputs are pending in the program's memory, the program held for this thread
        # until they are taken (copied once, into the arrays made here) or released
        taken = False
        try:
            outs = []
            dtype, ndim, nbytes = ctypes.c_int32(), ctypes.c_int32(), ctypes.c_int64()
            shape = (ctypes.c_int64 * MAX_DIM)()
            for i in range(count):
                if lib.et_runner_output(i, dtype, ndim, shape, nbytes) != 0:
                    raise _error(f"ExecuTorch method {self.name!r}")
                if dtype.value not in DTYPES:
                    raise BundleError(f"{self.name}: output {i} has ExecuTorch dtype "
                                      f"{dtype.value}, which numpy does not hold")
                outs.append(np.empty(tuple(shape[:ndim.value]), DTYPES[dtype.value]))
            dst = (ctypes.c_void_p * max(count, 1))(*[o.ctypes.data for o in outs])
            taken = True  # take_outputs releases the program, failing or not
            if lib.et_runner_take_outputs(count, dst) != 0:
                raise _error(f"ExecuTorch method {self.name!r}")
        finally:
            if not taken:
                lib.et_runner_release_outputs()
        return outs

    def attribute(self, name: str) -> np.ndarray:
        """A writable array aliasing mutable buffer ``name`` as this method reads it (it keeps
        the program loaded); BundleError where the method has no such buffer."""
        lib = _lib()
        data, dtype, ndim = ctypes.c_void_p(), ctypes.c_int32(), ctypes.c_int32()
        shape = (ctypes.c_int64 * MAX_DIM)()
        if lib.et_runner_attribute(self.program._handle, self._index, name.encode(),
                                   ctypes.byref(data), dtype, ndim, shape, MAX_DIM) != 0:
            raise _error(f"{self.program.what}: no mutable buffer {name!r}")
        if dtype.value not in DTYPES:
            raise BundleError(f"buffer {name!r} has ExecuTorch dtype {dtype.value}, which numpy "
                              "does not hold")
        dt, dims = DTYPES[dtype.value], tuple(shape[:ndim.value])
        nbytes = int(np.prod(dims, dtype=np.int64)) * dt.itemsize
        raw = np.asarray(_Memory(self.program, data.value or 0, nbytes))
        return raw.view(dt).reshape(dims)


class RunnerProgram:
    """A program loaded by the runner from a .pte file (mapped) or its bytes (copied), with
    its planned memory; BundleError naming ``what`` where ExecuTorch refuses it."""

    releases_gil = True

    def __init__(self, source: str | Path | bytes | bytearray, what: str | None = None) -> None:
        lib = _lib()
        _registries()
        self._handle = None
        if isinstance(source, (bytes, bytearray)):
            what = what or "ExecuTorch program (bytes)"
            buf = source if isinstance(source, bytes) else \
                (ctypes.c_char * len(source)).from_buffer(source)  # read in place, copied there
            handle = lib.et_runner_open_buffer(buf, len(source), what.encode())
        else:
            what = what or str(source)
            handle = lib.et_runner_open_file(str(source).encode())
        if not handle:
            raise _error(what)
        self._handle, self.what = handle, what
        self._methods: dict[str, RunnerMethod] = {}

    def hold(self) -> Callable[[], None]:
        """Pause this program's runs before their next instruction until the returned release
        is called (once): a switch voiding a run in flight holds it for the write, so the run
        stops sharing the cores with it (it cannot be abandoned part way; its caller discards
        and redoes it). Holds nest; runs go on when every hold is released."""
        _lib()
        hold = _HOLD[0]
        if hold(self._handle, 1) < 0:
            raise _error(self.what)
        released = []

        def release() -> None:
            if not released:
                released.append(True)
                if hold(self._handle, 0) < 0:
                    raise _error(self.what)
        return release

    def method(self, name: str) -> RunnerMethod:
        """Method ``name``, loaded on first use (loading initialises the mutable buffers it
        uses, shared ones included); BundleError where the program has none such or ExecuTorch
        cannot load it (a kernel or backend missing)."""
        method = self._methods.get(name)
        if method is None:
            index = _lib().et_runner_load_method(self._handle, name.encode())
            if index < 0:
                raise _error(self.what)
            method = self._methods[name] = RunnerMethod(self, name, index)
        return method

    def __del__(self) -> None:
        if getattr(self, "_handle", None) and _LIB:
            _LIB[0].et_runner_close(self._handle)
            self._handle = None
