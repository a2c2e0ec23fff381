"""Build and load edgeadapt's own ExecuTorch kernels, ``edgeadapt::live_linear.out``,
``edgeadapt::live_qlinear.out`` and ``edgeadapt::live_q4linear.out``, and their ``_a8`` forms
(int8 activations) (``edgeadapt/runtime/kernels/live_linear.cpp``: ``out = x @ w^T`` reading a
live weight, or its int8 codes, or its int4 codes packed two per byte, and scales, in place;
why there), and the
decoder's ``edgeadapt::cache_attention.out`` (``cache_attention.cpp``: causal attention reading
the KV cache buffers in place; :mod:`edgeadapt.export.executorch_attention`).

The executorch wheel ships its runtime as shared libraries (``executorch/lib/libexecutorch.so``,
``libexecutorch_threadpool.so``) with their headers (``executorch/include``), so a kernel
compiled against them and loaded with ``RTLD_GLOBAL`` before a program is registers into the
same kernel registry the Python runtime uses. The library is built once per (source,
executorch version, compiler flags, CPU features) by :func:`build_against_executorch` (also
the builder of edgeadapt's ExecuTorch runner, :mod:`.native_runner`) and loaded once per
process. A program exported with the
``own-kernel`` live form (:mod:`edgeadapt.export.executorch_live_form`) needs it on whatever
machine runs it; on a device it would be compiled into the runtime like any custom kernel.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

from edgeadapt.errors import MissingPackageError
from edgeadapt.runtime import native

SOURCE = native.KERNELS / "live_linear.cpp"
ATTENTION_SOURCE = native.KERNELS / "cache_attention.cpp"
#: the header of edgeadapt's own that SOURCE includes (its text is part of the build's key)
OWN_HEADERS = (native.KERNELS / "int8_tiles.h",)
#: the operator the library registers (ExecuTorch name)
OPERATOR = "edgeadapt::live_linear.out"
NEEDED_FOR = "the own-kernel ExecuTorch live form"
HINT = "; or export with --executorch-live-form weight-left"
CFLAGS = ("-DET_USE_THREADPOOL", "-DC10_USING_CUSTOM_GENERATED_MACROS")


def _executorch_root(needed_for: str) -> Path:
    try:
        import executorch
    except ImportError as exc:
        raise MissingPackageError(f"{needed_for} needs: pip install executorch") from exc
    return Path(next(iter(executorch.__path__)))  # a namespace package: no __file__


def compiler() -> str:
    """The C++ compiler the kernel is built with (:func:`edgeadapt.runtime.native.compiler`);
    ConfigError if none is on PATH."""
    return native.compiler(NEEDED_FOR, HINT)


def build_against_executorch(source: Path, name: str, cflags: tuple[str, ...] = (), *,
                             needed_for: str, hint: str) -> Path:
    """``source`` built into library ``name`` against the executorch wheel's headers and
    runtime libraries (:func:`edgeadapt.runtime.native.build`, keyed by the executorch
    version): edgeadapt's native code that calls into ExecuTorch (this kernel, the runner of
    :mod:`.native_runner`). ``cflags``: extra compiler flags."""
    root = _executorch_root(needed_for)
    try:
        version = __import__("executorch.version", fromlist=["__version__"]).__version__
    except ImportError:  # pragma: no cover - every wheel has it
        version = "unknown"
    lib = root / "lib"
    return native.build(
        source, name,
        [*CFLAGS, *cflags, f"-I{root / 'include'}",
         f"-I{root / 'include/executorch/runtime/core/portable_type/c10'}"],
        [f"-L{lib}", "-lexecutorch", "-lexecutorch_threadpool", f"-Wl,-rpath,{lib}"],
        key=[f"executorch {version}", *(h.read_text() for h in OWN_HEADERS)],
        needed_for=needed_for, hint=hint)


def library_path(cflags: tuple[str, ...] = ()) -> Path:
    """Where the built library lives (built now if missing; the compiler is needed only then).
    ``cflags``: extra compiler flags (tests build the portable path with ``-mno-avx512f``)."""
    return build_against_executorch(SOURCE, "liblive_linear.so", cflags,
                                    needed_for=NEEDED_FOR, hint=HINT)


def attention_library_path(cflags: tuple[str, ...] = ()) -> Path:
    """Where the attention kernel's library lives (built now if missing), as
    :func:`library_path`."""
    return build_against_executorch(ATTENTION_SOURCE, "libcache_attention.so", cflags,
                                    needed_for=NEEDED_FOR, hint=HINT)


_LIBRARY = native.Library(library_path, ctypes.RTLD_GLOBAL)
_ATTENTION = native.Library(attention_library_path, ctypes.RTLD_GLOBAL)


def load_kernel() -> Path:
    """Build (if needed) and load the kernel libraries into this process, once; the live
    linears' library's path."""
    _ATTENTION.load()
    return _LIBRARY.load()


def unavailable() -> str | None:
    """Why the kernels cannot be loaded in this process (no compiler and nothing built, a
    failed build), or None once they are loaded (built first if needed)."""
    return _ATTENTION.unavailable() or _LIBRARY.unavailable()
