"""The ExecuTorch weight store: live weights edited in place inside a loaded XNNPACK program.

The program runs on edgeadapt's native runner (the GIL released during a run) where it builds,
else on ExecuTorch's Python runtime (:mod:`.programs`; ``releases_gil`` says which).

Two modes (see docs/export_executorch.md):

- ``live``: loads ``section["file"]`` once. Each live weight is a shared mutable buffer of the
  program; the method's attribute (``get_attribute(buffer)``) is a writable (out, in) array
  aliasing the planned memory the forward reads (XNNPACK reads these linears' weights at run
  time, packing them per call), handed to the engine. ``commit`` is a no-op.
  Branch tensors (LoRA A/B, SiRA router/A/B) of a branch variant are exposed the same way by
  :meth:`ExecutorchStore.branch_tensors`. A quantized bundle's live weights are codes
  buffers with a scales buffer beside each (``quant``; docs/quantized.md, "ExecuTorch"): int8
  codes a code per byte, or int4 codes packed two per byte (``"packed": true``).
- ``repack``: keeps a host copy of the all-constant program (``section["repack"]["file"]``) and
  hands the engine numpy views into that copy at the byte offsets recorded (and verified by
  value) at export. ``commit`` reloads the program from the edited bytes, so XNNPACK packs every
  weight again: each switch costs one copy of the program plus one load (packing), and every
  forward then runs at the all-constant speed.
"""

from __future__ import annotations

import gc
import os
import threading
import weakref
from pathlib import Path

import numpy as np

from edgeadapt.errors import BundleError, ConfigError
from edgeadapt.format import nibbles
from edgeadapt.format.layout import backend_shape, to_torch
from edgeadapt.format.quant import grid as quant_grid
from edgeadapt.runtime.backends.executorch import SECTION
from edgeadapt.runtime.backends.executorch.programs import EtMethod, open_program
from edgeadapt.runtime.pages import collapse_to_huge_pages
from edgeadapt.runtime.store import Codes, LiveWeight, WeightStore

MODES = ("live", "repack")


_alive: weakref.WeakSet[ExecutorchStore] = weakref.WeakSet()  # stores whose programs may run
_pool_lock = threading.Lock()


def threadpool_size() -> int:
    """Threads of ExecuTorch's threadpool (one per process; XNNPACK and the own kernel use it;
    by default one per CPU core)."""
    from executorch.extension.pybindings import portable_lib

    return int(portable_lib._threadpool_get_thread_count())


def use_threads(threads: int | None) -> int:
    """Size ExecuTorch's threadpool to ``threads`` (None: leave it) and return its size.

    The pool is per process and resizing it destroys the old one, which every XNNPACK program
    loaded before keeps a pointer to; so it is resized only while no :class:`ExecutorchStore`
    of this process is alive (programs loaded outside edgeadapt are the caller's to drop
    first), and a ConfigError says so otherwise.
    """
    with _pool_lock:
        size = threadpool_size()
        if threads is None or threads == size:
            return size
        if threads < 1:
            raise ConfigError(f"threads={threads}: ExecuTorch needs at least one")
        gc.collect()  # stores dropped but not yet collected still count in the WeakSet
        if len(_alive):
            raise ConfigError(
                f"threads={threads}: ExecuTorch's threadpool is per process and has {size} "
                f"threads, which the {len(_alive)} ExecuTorch runtime(s) still loaded use; "
                "resizing it would pull it from under them. Drop them first, or load with "
                f"threads=None or {size}")
        from executorch.extension.pybindings import portable_lib

        portable_lib._unsafe_reset_threadpool(int(threads))
        return threadpool_size()


class ExecutorchStore(WeightStore):
    """A loaded ExecuTorch program plus numpy arrays aliasing its live weights.

    directory: folder holding the .pte files.  section: the ``"section"`` dict returned by
    :func:`edgeadapt.export.executorch.export_pte` (bundle.json's ``"executorch"`` entry).
    buffers: torch weight name -> mutable buffer name.  shapes: weight -> (out, in).
    sha256: weight -> base sha256 (checked by the engine), or None.
    threads: ExecuTorch's threadpool size (:func:`use_threads`; None: as it is).
    quant: quantized live weights (``--weights int8|int4``, docs/quantized.md): weight -> its
    bundle entry's ``quant`` (``{"grid", "scales": buffer, "packed", ...}``); their buffers
    hold int8 codes ``(out, in)``, or with ``"packed": true`` (int4; absent in bundles
    exported before: false) the codes two per byte, ``(out, in / 32, 16)`` uint8
    (:mod:`edgeadapt.format.nibbles`, handed to the engine as a packed
    :class:`~edgeadapt.runtime.store.LiveWeight` of the as-is layout), and the scales buffer
    ``(out, in // G)`` float32 beside them, handed to the engine as
    :class:`~edgeadapt.runtime.store.Codes`. Live mode only.
    native: run the program with edgeadapt's native runner, the GIL released
    (:func:`~edgeadapt.runtime.backends.executorch.programs.open_program`; None: where it is
    available, False: ExecuTorch's Python runtime); ``releases_gil`` says which runs it.
    """

    def __init__(self, directory: str | Path, section: dict, buffers: dict[str, str],
                 shapes: dict[str, tuple[int, int]], sha256: dict[str, str] | None = None,
                 mode: str = "live", threads: int | None = None,
                 quant: dict[str, dict] | None = None, native: bool | None = None) -> None:
        if mode not in MODES:
            raise ConfigError(f"executorch mode {mode!r} not in {MODES}")
        quant = quant or {}
        if quant and mode != "live":
            raise ConfigError(f"a quantized ExecuTorch bundle "
                              f"({section.get('precision', 'int')}) runs with mode='live' only "
                              "(its codes are read by edgeadapt's kernel in place)")
        self.threads = use_threads(threads)
        self.directory = Path(directory)
        self.section = section
        self.mode = mode
        self.native = native
        self.input_names = [i["name"] for i in section["inputs"]]
        self.max_batch = int(section["max_batch"])
        self.max_seq = int(section["max_seq"])
        sha256 = sha256 or {}
        self._branch: dict[str, dict[str, np.ndarray]] = {}
        self._buffers = dict(buffers)
        if mode == "live":
            if section.get("live_form") == "own-kernel":
                from edgeadapt.runtime.backends.executorch.kernel import load_kernel

                load_kernel()  # the program's live linears call edgeadapt::live_linear.out
                self.kernel = True
            path = self._path(section["file"])
            self._load(path, str(path))
            arrays = {w: self._attribute(b) for w, b in buffers.items()}
            # huge pages under the planned buffers: the scattered switch writes then rarely
            # miss the TLB (pages.collapse_to_huge_pages; docs/bench.md)
            self.collapsed_bytes = 0 if os.environ.get("EDGEADAPT_NO_COLLAPSE") else \
                collapse_to_huge_pages(arrays)
            for w, params in section.get("branch_buffers", {}).items():
                self._branch[w] = {p: self._attribute(b) for p, b in params.items()}
            layouts = dict.fromkeys(buffers, "as-is")
        else:
            repack = section.get("repack")
            if not repack:
                raise BundleError("this ExecuTorch export has no constant program for repack "
                                  "mode (branch variant, or exported with repack=False)")
            self._blob = bytearray(self._path(repack["file"]).read_bytes())
            self._load_from_blob()
            arrays, layouts = {}, {}
            for w in buffers:
                info = repack["weights"][w]
                out, inp = shapes[w]
                offset = int(info["offset"])
                if not 0 <= offset <= len(self._blob) - 4 * out * inp:
                    raise BundleError(f"{repack['file']}: weight {w!r} at byte {offset} "
                                      f"({out}x{inp} float32) lies outside the program "
                                      f"({len(self._blob)} bytes)")
                layouts[w] = info["layout"]
                shape = (out, inp) if info["layout"] == "as-is" else (inp, out)
                arrays[w] = np.frombuffer(self._blob, dtype=np.float32, count=out * inp,
                                          offset=offset).reshape(shape)
        codes = {w: self._codes(w, q, tuple(shapes[w])) for w, q in quant.items()}
        packed = {w for w, q in quant.items() if q.get("packed")}
        kinds = {np.dtype(np.uint8): "int4 codes packed two per byte",
                 np.dtype(np.int8): "codes a code per byte"}
        self._live = {}
        for w, arr in arrays.items():
            said = kinds[np.dtype(np.uint8 if w in packed else np.int8)] if w in codes \
                else "float"
            if kinds.get(arr.dtype, "float") != said:
                raise BundleError(f"{section['file']}: live weight {w!r} is {arr.dtype}, but "
                                  f"bundle.json says it holds {said}")
            try:
                self._live[w] = LiveWeight(w, arr, layouts[w], tuple(shapes[w]), sha256.get(w),
                                           codes.get(w), packed=w in packed)
            except ValueError as exc:
                raise BundleError(f"{section['file']}: {exc}") from None
        _alive.add(self)

    # -- WeightStore ---------------------------------------------------------------------------

    def live_weights(self) -> dict[str, LiveWeight]:
        return self._live

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Logits of one forward; inputs: int64 (batch, seq) arrays named as in the section."""
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise ConfigError(f"executorch run: missing inputs {missing}")
        args = []
        for name in self.input_names:
            arr = np.ascontiguousarray(inputs[name], dtype=np.int64)
            if arr.ndim != 2 or not (1 <= arr.shape[0] <= self.max_batch
                                     and 1 <= arr.shape[1] <= self.max_seq):
                raise ConfigError(
                    f"executorch run: {name} has shape {arr.shape}; this program takes "
                    f"(batch <= {self.max_batch}, seq <= {self.max_seq}) — re-export with "
                    "larger max_batch / max_seq")
            args.append(arr)
        method = self._method
        if self._static:
            method = self._static.get(args[0].shape)
            if method is None:
                raise ConfigError(f"executorch run: this program has static shapes "
                                  f"{sorted(self._static)} only, got {args[0].shape}")
        return method.execute(args)[0]

    def commit(self, changes: dict[str, np.ndarray | None]) -> None:
        """Live: nothing to do (the program reads the buffers). Repack: reload the program."""
        if self.mode == "repack" and changes:
            self._load_from_blob()

    # -- extras --------------------------------------------------------------------------------

    def branch_tensors(self) -> dict[str, dict[str, np.ndarray]]:
        """Branch variant: weight -> {param: writable array aliasing its buffer} (zero = off)."""
        return self._branch

    def read_back(self, name: str, raw: bool = False) -> np.ndarray:
        """A copy of live weight ``name`` (torch layout (out, in); packed int4 codes unpacked)
        as the loaded program holds it now, read through a fresh ``get_attribute`` of its
        mutable buffer, so checks need not trust the arrays the engine writes. ``raw``: the
        buffer's elements as held (a packed weight's bytes ``(out, in / 32, 16)``). Live mode
        only (a repack program has no buffers)."""
        if self.mode != "live":
            raise ConfigError("read_back needs a live-mode store (repack weights are constants)")
        if name not in self._buffers:
            raise BundleError(f"{name!r} is not a live weight of this program")
        view = self._method.attribute(self._buffers[name])
        lw = self._live[name]
        if raw:
            return view.copy()
        if lw.packed:
            return to_torch(nibbles.unpack(view).reshape(backend_shape(lw.shape, lw.layout)),
                            lw.shape, lw.layout)
        return view.reshape(lw.shape).copy()

    def method(self, name: str) -> EtMethod:
        """Method ``name`` of the loaded program (:class:`~.programs.EtMethod`), one of those
        loaded with it (``section["methods"]``: the decoder's ``decode``): it reads the
        program's shared mutable buffers, the live weights among them. BundleError for any
        other name: loading a method later would set every initialised buffer back to its
        initial value, the live weights to the base under the engine's feet."""
        method = self._extra.get(name)
        if method is None:
            raise BundleError(f"the ExecuTorch program was loaded without a method {name!r} "
                              f"(loaded: {sorted(self._extra)}); re-export with --generate")
        return method

    def buffer(self, name: str, method: EtMethod) -> np.ndarray:
        """A writable numpy array aliasing mutable buffer ``name`` of ``method`` (kept alive
        with the store); BundleError where the method has no such buffer."""
        return self._attribute(name, method)

    # -- internals -----------------------------------------------------------------------------

    def _codes(self, name: str, quant: dict, shape: tuple[int, int]) -> Codes:
        """The grid and scales of quantized live weight ``name``: its scales buffer (a view,
        as the program holds it) and a copy the engine rounds onto; BundleError for an unknown
        grid, or scales that are missing, misshapen, zero or NaN."""
        where = f"{self.section['file']}: quantized live weight {name!r}"
        try:
            grid = quant_grid(quant.get("grid", ""))
            held = self._attribute(quant.get("scales", ""))
            grid.check_scales(held, shape, "scales")
        except ConfigError as exc:
            raise BundleError(f"{where}: {exc}") from None
        return Codes(grid, np.array(held, dtype=np.float32), quant["scales"], held,
                     quant.get("codes_sha256"))

    def _path(self, name: str) -> Path:
        path = self.directory / name
        if not path.is_file():
            raise BundleError(f"ExecuTorch program {path} is missing")
        return path

    def _attribute(self, buffer: str, method: EtMethod | None = None) -> np.ndarray:
        arr = (method or self._method).attribute(buffer)  # BundleError where there is none
        if not arr.flags.writeable:
            raise BundleError(f"buffer {buffer!r} is not writable")
        return arr

    def _load_from_blob(self) -> None:
        self._load(self._blob, f"{self.directory / self.section['repack']['file']}")

    def _load(self, source: Path | bytearray, what: str) -> None:
        """Load the program (a .pte path, or the repack blob, copied) and every method it will
        run, with :func:`~.programs.open_program` (``native``):
        dynamic-shape programs have one ``forward``, static ones (SiRA) one method per "BxS"
        shape, a ``--generate`` live program also ``decode``, all sharing the mutable buffers.
        All of them now, before anything is written: loading a method (re)initialises the
        initialised mutable buffers, the live weights. Nothing is replaced unless all of it
        loads; BundleError naming ``what`` where ExecuTorch refuses the program (corrupt,
        truncated)."""
        methods = self.section["methods"]
        decode = methods.get("decode") if self.mode == "live" else None
        program = open_program(source, what, self.native)
        static = {tuple(int(v) for v in k.split("x")): program.method(m)
                  for k, m in (methods.get("static") or {}).items()}
        method = (program.method(methods["forward"]) if methods.get("forward")
                  else next(iter(static.values())))
        extra = {decode: program.method(decode)} if decode else {}
        self._program, self._static, self._method = program, static, method
        self._extra = extra
        self.releases_gil = program.releases_gil


def open_store(directory: str | Path, manifest: dict, mode: str = "live",
               section: dict | None = None, threads: int | None = None,
               native: bool | None = None) -> ExecutorchStore:
    """An :class:`ExecutorchStore` from a bundle.json dict (its ``"executorch"`` section unless
    ``section`` names another variant's)."""
    section = section or manifest.get(SECTION)
    if not section:
        raise BundleError("bundle has no ExecuTorch program; re-export with --backends executorch")
    weights = manifest.get("weights", {})
    try:
        buffers = {w: info["executorch"]["buffer"] for w, info in weights.items()}
        shapes = {w: tuple(info["shape"]) for w, info in weights.items()}
    except (KeyError, TypeError) as exc:
        raise BundleError(f"bundle.json weights lack ExecuTorch buffer names: {exc}") from exc
    sha = {w: info["sha256"] for w, info in weights.items() if "sha256" in info}
    quant = {w: info["executorch"]["quant"] for w, info in weights.items()
             if "quant" in info["executorch"]}
    return ExecutorchStore(directory, section, buffers, shapes, sha, mode, threads, quant, native)
