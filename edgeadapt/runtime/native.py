"""Build edgeadapt's own kernels (``kernels/*.cpp``) once per machine, with the system C++
compiler, into a cache (numpy-free, torch-free).

A library is built once per (source text, compiler arguments, extra key, machine, CPU
features) with ``-march=native`` into ``$EDGEADAPT_CACHE`` (default
``~/.cache/edgeadapt``)/kernels/<hash>/<name>, atomically (temp dir + rename, so a reader sees
no library or a whole one); the CPU features are part of the key so a cache shared between
machines never hands one a library with instructions it lacks. Users:
:mod:`edgeadapt.runtime.executorch_kernel` and :mod:`edgeadapt.runtime.onnxruntime_kernel`.
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
from collections.abc import Callable, Sequence
from pathlib import Path

from edgeadapt.errors import ConfigError

KERNELS = Path(__file__).with_name("kernels")
#: no -ffast-math: GCC then links crtfastmath.o, whose constructor turns on flush-to-zero for
#: the whole process when the library loads (denormals in numpy and torch become 0). The
#: kernels keep independent accumulators, so they vectorise without reassociation.
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")


def compiler(needed_for: str = "edgeadapt's own kernels", hint: str = "") -> str:
    """The C++ compiler kernels are built with: $CXX, c++, g++ or clang++; ConfigError (naming
    ``needed_for``, then ``hint``) if none is on PATH."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    raise ConfigError(f"{needed_for} needs a C++ compiler (set CXX, or install g++){hint}")


def _cpu_signature() -> str:
    """What ``-march=native`` compiles for: the CPU's feature flags (Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def build(source: Path, name: str, cflags: Sequence[str] = (), ldflags: Sequence[str] = (),
          key: Sequence[str] = (), needed_for: str = "edgeadapt's own kernels",
          hint: str = "") -> Path:
    """The path of ``name`` built from ``source`` as ``c++ FLAGS cflags source -o name
    ldflags`` (built now if not cached; the compiler is needed only then). ``key``: what else
    the library depends on (a runtime version, header text). ConfigError if the build fails
    or there is no compiler (:func:`compiler`)."""
    digest = hashlib.sha256("\0".join([source.read_text(), *FLAGS, *cflags, *ldflags, *key,
                                       platform.machine(), _cpu_signature()]).encode())
    cache = Path(os.environ.get("EDGEADAPT_CACHE", Path.home() / ".cache" / "edgeadapt"))
    target = cache / "kernels" / digest.hexdigest()[:16] / name
    if target.exists():
        return target
    cxx = compiler(needed_for, hint)
    target.parent.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent.parent, prefix=".build-"))
    try:
        cmd = [cxx, *FLAGS, *cflags, str(source), "-o", str(tmp / name), *ldflags]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise ConfigError(f"building {source.name} failed ({' '.join(cmd)}):\n"
                              f"{done.stderr[-2000:]}")
        try:
            tmp.rename(target.parent)  # atomic: a reader sees no library or a whole one
        except OSError:  # another process built it first
            if not target.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


class Library:
    """A kernel library loaded into this process once and kept loaded (a session or program
    may call it until the process ends). ``path``: builds it if needed and returns its path
    (ConfigError where it cannot be built); ``mode``: ``ctypes.CDLL``'s (``RTLD_GLOBAL`` where
    the library registers into another library's registry)."""

    def __init__(self, path: Callable[[], Path], mode: int = ctypes.DEFAULT_MODE) -> None:
        self._path = path
        self._mode = mode
        self._lock = threading.Lock()
        self.loaded: tuple[Path, ctypes.CDLL] | None = None  # (path, library) once loaded

    def load(self) -> Path:
        """Build (if needed) and load the library, once; its path."""
        with self._lock:
            if self.loaded is None:  # later calls skip the hashing and the cache lookup
                path = self._path()
                self.loaded = (path, ctypes.CDLL(str(path), mode=self._mode))
            return self.loaded[0]

    def unavailable(self) -> str | None:
        """Why the library cannot be loaded in this process (no compiler or headers and
        nothing built, a failed build), or None once it is loaded (built first if needed)."""
        try:
            self.load()
        except ConfigError as exc:
            return str(exc)
        return None
