"""Build and load edgeadapt's own ONNX Runtime kernel, the custom op ``edgeadapt.BlockedMatMul``
(``edgeadapt/runtime/kernels/blocked_matmul.cpp``: ``y = x @ W.T`` reading a blocked32 live
weight in place; why there), its quantized forms and the affine grid's ``edgeadapt.BlockOffsets``
(``block_offsets.h``, included). Torch-free.

A custom op library is compiled against ONNX Runtime's C/C++ API headers and handed to a
session with ``SessionOptions.register_custom_ops_library``; it links to nothing (the runtime
passes its API table in), so one build serves every onnxruntime wheel whose API version is at
least the headers'. The onnxruntime wheels ship no headers; ``scripts/ort_headers.py``
(``make setup`` runs it) installs them from Debian's ``libonnxruntime-dev`` into the virtual
environment. Looked for, in order: ``$EDGEADAPT_ORT_INCLUDE``, ``<sys.prefix>/include/
onnxruntime``, ``/usr/include/onnxruntime``, ``/usr/local/include/onnxruntime``.

The library is built once per machine by :func:`edgeadapt.runtime.native.build` and loaded
once per process (and kept loaded: a session may outlive its options). Where it cannot be
built (no headers, no compiler, an older runtime), :func:`unavailable` says why and the live
session reads the blocked32 weights through MatMul (:mod:`edgeadapt.graphs.blocked`);
:func:`use_kernel` is that decision.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path

from edgeadapt.errors import ConfigError
from edgeadapt.format.layout import BLOCKED
from edgeadapt.runtime import native

SOURCE = native.KERNELS / "blocked_matmul.cpp"
#: the headers of edgeadapt's own that SOURCE includes (their text is part of the build's key)
OWN_HEADERS = (native.KERNELS / "block_offsets.h", native.KERNELS / "int8_tiles.h",
               native.KERNELS / "ort_kernel.h")
HEADER = "onnxruntime_cxx_api.h"
NEEDED_FOR = "edgeadapt's ONNX Runtime kernel"


def include_dirs() -> list[Path]:
    """Where the headers are looked for, in order."""
    env = os.environ.get("EDGEADAPT_ORT_INCLUDE")
    return [Path(p) for p in ([env] if env else [])] + [
        Path(sys.prefix) / "include" / "onnxruntime", Path("/usr/include/onnxruntime"),
        Path("/usr/local/include/onnxruntime")]


def include_dir() -> Path:
    """The first of :func:`include_dirs` holding the C++ API header; ConfigError if none."""
    for d in include_dirs():
        if (d / HEADER).is_file():
            return d
    raise ConfigError(f"{NEEDED_FOR} needs ONNX Runtime's C++ API headers ({HEADER}), found "
                      f"in none of {[str(d) for d in include_dirs()]}: run "
                      "`python scripts/ort_headers.py` (make setup does), install "
                      "libonnxruntime-dev, or set EDGEADAPT_ORT_INCLUDE")


def api_version(include: Path) -> int:
    """``ORT_API_VERSION`` of the headers in ``include``."""
    text = (include / "onnxruntime_c_api.h").read_text(errors="replace")
    found = re.search(r"#define\s+ORT_API_VERSION\s+(\d+)", text)
    if not found:
        raise ConfigError(f"{include}: onnxruntime_c_api.h defines no ORT_API_VERSION")
    return int(found.group(1))


def runtime_api_version() -> int:
    """The API version of the installed onnxruntime: its minor version (1.31 -> 31)."""
    import onnxruntime as ort

    return int(ort.__version__.split(".")[1])


def library_path(cflags: tuple[str, ...] = ()) -> Path:
    """Where the built library lives (built now if missing; the compiler is needed only then).
    ConfigError if there are no headers, they are newer than the runtime, or the build fails.
    ``cflags``: extra compiler flags (tests build the portable path with ``-mno-avx512f``)."""
    include = include_dir()
    version = api_version(include)
    if version > runtime_api_version():
        raise ConfigError(f"{NEEDED_FOR}: the headers in {include} are API version {version}, "
                          f"newer than the installed onnxruntime's {runtime_api_version()}")
    return native.build(SOURCE, "libedgeadapt_ort.so", [*cflags, f"-I{include}"],
                        key=[f"ORT_API_VERSION {version}", str(include),
                             *(h.read_text() for h in OWN_HEADERS)],
                        needed_for=NEEDED_FOR)


_LIBRARY = native.Library(library_path)


def load() -> Path:
    """Build (if needed) and load the library into this process, once; its path."""
    return _LIBRARY.load()


def unavailable() -> str | None:
    """Why the kernel cannot be used in this process, or None once it is loaded (built first
    if needed)."""
    return _LIBRARY.unavailable()


def register(options) -> None:
    """Make ``edgeadapt.BlockedMatMul`` known to sessions built with ``options``
    (an ``onnxruntime.SessionOptions``)."""
    options.register_custom_ops_library(str(load()))


def use_kernel(kernel: bool | None, layouts: Iterable[str]) -> bool:
    """Whether a CPU live session reads its blocked32 live weights (``layouts``: those of the
    live weights) with edgeadapt's own kernel: ``kernel`` None where the kernel can be built
    and loaded here (:func:`unavailable`), True always (ConfigError if it cannot be), False
    never. False without blocked32 live weights."""
    if kernel is False or BLOCKED not in set(layouts):
        return False
    if kernel is None:
        return unavailable() is None
    load()
    return True
