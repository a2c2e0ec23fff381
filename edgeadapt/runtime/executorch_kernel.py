"""Build and load edgeadapt's own ExecuTorch kernel, ``edgeadapt::live_linear.out``
(``kernels/live_linear.cpp``: ``out = x @ w^T`` reading a live weight in place; why there).

The executorch wheel ships its runtime as shared libraries (``executorch/lib/libexecutorch.so``,
``libexecutorch_threadpool.so``) with their headers (``executorch/include``), so a kernel
compiled against them and loaded with ``RTLD_GLOBAL`` before a program is registers into the
same kernel registry the Python runtime uses. The library is built once per (source,
executorch version, compiler flags, CPU features) with the system C++ compiler and
``-march=native`` into ``$EDGEADAPT_CACHE`` (default ``~/.cache/edgeadapt``)/kernels/<hash>/,
atomically (temp dir + rename), and loaded once per process. A program exported with the
``own-kernel`` live form (:mod:`edgeadapt.export.executorch_live_form`) needs it on whatever
machine runs it; on a device it would be compiled into the runtime like any custom kernel.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from edgeadapt.errors import ConfigError, MissingPackageError

SOURCE = Path(__file__).with_name("kernels") / "live_linear.cpp"
#: the operator the library registers (ExecuTorch name)
OPERATOR = "edgeadapt::live_linear.out"
#: no -ffast-math: GCC then links crtfastmath.o, whose constructor turns on flush-to-zero for
#: the whole process when the library loads (denormals in numpy and torch become 0). The
#: kernel's loops keep independent accumulators, so they vectorise without reassociation.
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC",
         "-DET_USE_THREADPOOL", "-DC10_USING_CUSTOM_GENERATED_MACROS")

_lock = threading.Lock()
_loaded: tuple[Path, ctypes.CDLL] | None = None  # (path, library) once loaded


def _executorch_root() -> Path:
    try:
        import executorch
    except ImportError as exc:
        raise MissingPackageError("the own-kernel live form needs: pip install executorch") \
            from exc
    return Path(next(iter(executorch.__path__)))  # a namespace package: no __file__


def compiler() -> str:
    """The C++ compiler the kernel is built with: $CXX, c++, g++ or clang++; ConfigError if
    none is on PATH."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    raise ConfigError("the own-kernel ExecuTorch live form needs a C++ compiler (set CXX, or "
                      "install g++); or export with --pte-live-form weight-left")


def _cpu_signature() -> str:
    """What ``-march=native`` compiles for: the CPU's feature flags (Linux), so a cache shared
    between machines never hands one a library with instructions it lacks."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def library_path() -> Path:
    """Where the built library lives (built now if missing; the compiler is needed only then)."""
    root = _executorch_root()
    try:
        version = __import__("executorch.version", fromlist=["__version__"]).__version__
    except ImportError:  # pragma: no cover - every wheel has it
        version = "unknown"
    key = hashlib.sha256("\0".join([SOURCE.read_text(), version, *FLAGS, platform.machine(),
                                    _cpu_signature()]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("EDGEADAPT_CACHE", Path.home() / ".cache" / "edgeadapt"))
    target = cache / "kernels" / key / "liblive_linear.so"
    if target.exists():
        return target
    cxx = compiler()
    target.parent.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent.parent, prefix=".build-"))
    try:
        lib = root / "lib"
        cmd = [cxx, *FLAGS, f"-I{root / 'include'}",
               f"-I{root / 'include/executorch/runtime/core/portable_type/c10'}",
               str(SOURCE), "-o", str(tmp / target.name), f"-L{lib}", "-lexecutorch",
               "-lexecutorch_threadpool", f"-Wl,-rpath,{lib}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise ConfigError(f"building {SOURCE.name} failed ({' '.join(cmd)}):\n"
                              f"{done.stderr[-2000:]}")
        try:
            tmp.rename(target.parent)  # atomic: a reader sees no library or a whole one
        except OSError:  # another process built it first
            if not target.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_kernel() -> Path:
    """Build (if needed) and load the kernel library into this process, once; its path."""
    global _loaded
    with _lock:
        if _loaded is None:  # later stores skip the hashing and the cache lookup
            path = library_path()
            _loaded = (path, ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL))
        return _loaded[0]


def unavailable() -> str | None:
    """Why the kernel cannot be loaded in this process (no compiler and nothing built, a
    failed build), or None once it is loaded (built first if needed)."""
    try:
        load_kernel()
    except ConfigError as exc:
        return str(exc)
    return None
