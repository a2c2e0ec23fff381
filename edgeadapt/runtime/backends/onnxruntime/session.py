"""ONNX Runtime sessions as the stores and variants build them (numpy + onnx, no torch).

Every session gets :func:`session_options`; the CPU live sessions come from :func:`cpu_session`
(edgeadapt's kernel in place of the blocked32 MatMul pattern where it is used), the constant
sessions of repack mode from :func:`graph_with_initializers` plus
:func:`add_constant_initializers`; :func:`run_bound` is one forward through an IOBinding whose
weights are already bound. ONNX Runtime's and onnx's own load errors come back as BundleError
naming the file (:func:`open_session`, :func:`read_graph`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from edgeadapt.errors import BundleError, ConfigError, MissingPackageError
from edgeadapt.format.layout import BLOCKED, transposed_from_blocked
from edgeadapt.runtime.store import LiveWeight

try:
    import onnxruntime as ort
except ImportError:  # pragma: no cover - exercised only where onnxruntime is absent
    ort = None


def require_ort():
    """The onnxruntime module; MissingPackageError if it is not installed."""
    if ort is None:
        raise MissingPackageError("onnxruntime is not installed: pip install onnxruntime")
    return ort


def session_options(threads: int | None, extra: dict[str, str] | None = None):
    """Options for every session: spinning stopped when idle (several sessions in a process),
    ``threads`` intra-op threads (None: ONNX Runtime's default), prepacking left on."""
    so = require_ort().SessionOptions()
    so.add_session_config_entry("session.force_spinning_stop", "1")
    if threads is not None:
        so.intra_op_num_threads = int(threads)
    for k, v in (extra or {}).items():
        so.add_session_config_entry(k, v)
    return so


def cpu_session(model_path: Path, so, blocked: list[str], kernel: bool,
                quantized: Sequence[str] = (), packed: Sequence[str] = (),
                every_constant: bool | None = None) -> tuple[object, bool]:
    """(a CPU session over ``model_path`` built with options ``so``, whether it uses the kernel).

    kernel: replace every reader of the blocked32 graph inputs ``blocked`` by edgeadapt's own
    ``edgeadapt.BlockedMatMul`` (:func:`edgeadapt.graphs.blocked.kernel_blocked_matmuls`;
    the library from :mod:`edgeadapt.runtime.backends.onnxruntime.kernel`, which must be
    loadable), which reads them in place instead of through MatMul's per-call copy of each B
    panel (docs/bench.md), and every reader of the quantized codes inputs ``quantized`` (with
    their dequantization) by ``edgeadapt.QBlockedMatMul``
    (:func:`edgeadapt.graphs.quantized.kernel_quantized_matmuls`; ``packed``: those of them
    bound as int4 codes two per byte, read by ``edgeadapt.Q4BlockedMatMul``). An affine int4
    graph's offset terms become one ``edgeadapt.BlockOffsets`` per input
    (:func:`edgeadapt.graphs.offsets.kernel_block_offsets`). The rewritten graph is handed over
    as bytes, its external data read from the model's folder; constants re-laid for the
    kernel are copied in while ONNX Runtime loads it. every_constant: the kernel reads every
    float MatMul constant and symmetric int4 MatMulNBits too, not only those of a live
    weight's ``x`` (True: the KV-cache decoder; ``kernel_blocked_matmuls``); None, the
    default: every int4 one but only the float ones of a live weight's ``x`` (the forward:
    at 8 x 64 tokens MLAS's float GEMM is a little faster than the kernel, while the kernel's
    int8 products beat ``MatMulNBits`` at every shape: docs/quantized.md); False: neither.
    """
    if kernel and (blocked or quantized):
        from edgeadapt.graphs.blocked import kernel_blocked_matmuls
        from edgeadapt.graphs.offsets import kernel_block_offsets
        from edgeadapt.graphs.quantized import kernel_quantized_matmuls
        from edgeadapt.runtime.backends.onnxruntime import kernel as own_kernel

        model = read_graph(model_path)
        floats = kernel_blocked_matmuls(model, blocked, model_path.parent,
                                        bool(every_constant))
        codes = kernel_quantized_matmuls(model, quantized, set(packed), model_path.parent,
                                         every_constant=every_constant is not False)
        constants = floats.constants | codes.constants
        if floats.replaced + codes.replaced + len(constants) + kernel_block_offsets(model):
            own_kernel.register(so)
            so.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                        str(model_path.parent))
            if constants:  # copied in by ONNX Runtime while it loads the graph
                ort = require_ort()
                so.add_external_initializers(
                    list(constants),
                    [ort.OrtValue.ortvalue_from_numpy(a) for a in constants.values()])
            return open_session(model.SerializeToString(), so, model_path), True
    if packed:
        raise ConfigError(f"{model_path}: int4 codes packed two per byte need edgeadapt's "
                          "kernel to read them")
    return open_session(str(model_path), so, model_path), False


def open_session(source: str | bytes, so, model_path: Path, providers: Sequence = (
        "CPUExecutionProvider",)):
    """An InferenceSession of ``source`` (a path, or the graph as bytes); BundleError naming
    ``model_path`` where ONNX Runtime cannot load it (a corrupt or truncated file, missing
    external data): its own errors are untyped."""
    try:
        return require_ort().InferenceSession(source, so, providers=list(providers))
    except Exception as exc:  # onnxruntime's pybind errors (InvalidProtobuf, Fail, ...)
        raise BundleError(f"{model_path}: ONNX Runtime cannot load this graph: {exc}") from exc


def read_graph(model_path: Path):
    """The ONNX graph at ``model_path`` without its external data; BundleError if it cannot be
    read or parsed."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        return onnx.load(str(model_path), load_external_data=False)
    except (OSError, DecodeError, ValueError) as exc:
        raise BundleError(f"{model_path}: not a readable ONNX graph: {exc}") from exc


def live_session(model_path: Path, so, live: Mapping[str, LiveWeight],
                 input_names: Mapping[str, str], kernel: bool,
                 every_constant: bool | None = None) -> tuple[object, bool, dict]:
    """A CPU session of ``model_path`` whose live-weight inputs read the runtime-owned buffers
    of ``live`` (torch name -> LiveWeight; ``input_names``: torch name -> graph input name):
    (session, whether edgeadapt's kernel reads the blocked32 ones (:func:`cpu_session`),
    {input name: OrtValue aliasing the buffer}). Bind the values once per IOBinding
    (:func:`thread_binding`) and never rebind: the switch engine edits the buffers in place.
    BundleError if a live weight is not an input of the graph."""
    ort = require_ort()
    session, used = cpu_session(
        model_path, so, [input_names[n] for n, lw in live.items()
                         if lw.layout == BLOCKED and lw.codes is None], kernel,
        [input_names[n] for n, lw in live.items() if lw.codes is not None],
        [input_names[n] for n, lw in live.items() if lw.packed], every_constant)
    graph_inputs = {i.name for i in session.get_inputs()}
    missing = sorted(input_names[n] for n in live if input_names[n] not in graph_inputs)
    missing += sorted(lw.codes.name for lw in live.values()
                      if lw.codes is not None and lw.codes.name not in graph_inputs)
    if missing:
        raise BundleError(f"{model_path}: live weights {missing} are not graph inputs")
    values = {input_names[n]: ort.OrtValue.ortvalue_from_numpy(lw.array)
              for n, lw in live.items()}
    values |= {lw.codes.name: ort.OrtValue.ortvalue_from_numpy(lw.codes.array)
               for lw in live.values() if lw.codes is not None}  # scales: read, never edited
    return session, used, values


def thread_binding(local: threading.local, session, values: Mapping[str, object],
                   bind: Callable[[object], None] | None = None):
    """The calling thread's IOBinding of ``session`` (``local.binding``), made on its first run
    with ``values`` (input name -> OrtValue aliasing a runtime-owned buffer) bound once: an
    IOBinding is not safe to share between threads, and rebinding would copy nothing but
    cost a call per input. ``bind``: called with the new IOBinding to bind what ``values``
    cannot hold (the device store's buffers, bound by pointer)."""
    b = getattr(local, "binding", None)
    if b is None:
        b = session.io_binding()
        for name, value in values.items():
            b.bind_ortvalue_input(name, value)
        if bind is not None:
            bind(b)
        local.binding = b
    return b


class BranchTensors:
    """The branch tensors of a graph variant as every session of that variant binds them (its
    forward graph's and its KV-cache decoder's): overridable-initializer inputs, bound with
    ``bind_ortvalue_input`` to OrtValues aliasing the arrays given to :meth:`set`. Each
    thread's IOBinding rebinds them when it sees a new generation (:meth:`bind`), so a switch
    reaches both sessions at once."""

    def __init__(self) -> None:
        self._current: tuple[int, dict[str, object]] = (0, {})  # replaced whole: one read

    @property
    def generation(self) -> int:
        return self._current[0]

    def set(self, feeds: dict[str, np.ndarray]) -> None:
        """Make ``feeds`` (input name -> float32 array) the branch tensors of later runs (the
        OrtValues alias the arrays and keep them alive)."""
        rt = require_ort()
        values = {k: rt.OrtValue.ortvalue_from_numpy(v) for k, v in feeds.items()}
        self._current = (self._current[0] + 1, values)

    def bind(self, local: threading.local, binding) -> None:
        """Bind the current branch tensors to ``binding`` (the calling thread's, of one
        session: ``local`` is that session's thread-local state) unless it has them already.
        ``local`` keeps what it bound alive until it binds newer ones, so a step that runs
        while a switch sets new tensors (an optimistic one) never reads freed memory."""
        generation, values = self._current
        if getattr(local, "branches", (-1, None))[0] != generation:
            for name, value in values.items():
                binding.bind_ortvalue_input(name, value)
            local.branches = (generation, values)


def branch_specs(session) -> dict[str, list]:
    """A variant session's branch inputs (its float overridable initializers): name -> dims
    (int, or str where symbolic)."""
    return {i.name: list(i.shape) for i in session.get_overridable_initializers()
            if i.type == "tensor(float)"}


def run_bound(session, binding, feeds: dict[str, np.ndarray], output_name: str) -> np.ndarray:
    """One forward through ``binding`` (weights already bound to it): bind the model inputs
    ``feeds`` on the CPU, run, return the single output as numpy.

    The output is the numpy view of the OrtValue ONNX Runtime allocated for this run (it keeps
    that OrtValue alive; the next run gets a new one), not ``copy_outputs_to_cpu``'s copy: on
    SmolLM2 at 8x64 the logits are 100 MB and the copy made live mode 1.15x the base forward
    instead of 0.99x (``session.run``, which the base uses, returns such a view too).
    """
    for name, x in feeds.items():
        binding.bind_cpu_input(name, x)
    binding.bind_output(output_name, "cpu")
    session.run_with_iobinding(binding)
    out = binding.get_outputs()[0].numpy()
    binding.clear_binding_outputs()
    return out


def graph_with_initializers(model_path: Path, names: list[str]) -> tuple[bytes, dict[str, str]]:
    """The model with the given graph inputs turned into (placeholder) initializers; the
    placeholders are overridden with ``add_initializer`` at every session build.

    A blocked32 input (3-D) is first turned back into a ``(in, out)`` one read by a plain MatMul
    (:func:`edgeadapt.graphs.blocked.unblock_live_matmuls`), because ONNX Runtime prepacks
    only 2-D MatMul weights. Returns (model bytes, {blocked input name: its transposed name});
    supply the values with :func:`add_constant_initializers`."""
    from onnx import numpy_helper

    from edgeadapt.graphs.blocked import unblock_live_matmuls

    model = read_graph(model_path)
    renamed = unblock_live_matmuls(model, names)
    by_name = {i.name: i for i in model.graph.input}
    for name in (renamed.get(n, n) for n in names):
        vi = by_name.get(name)
        if vi is None:
            raise BundleError(f"{model_path}: {name!r} is not a graph input")
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        model.graph.input.remove(vi)
        model.graph.initializer.append(
            numpy_helper.from_array(np.zeros(dims, dtype=np.float32), name))
    return model.SerializeToString(), renamed


def constant_values(values: Mapping[str, np.ndarray], renamed: Mapping[str, str]
                    ) -> dict[str, np.ndarray]:
    """What a constant session is given for its live weights (graph name -> buffer): each
    buffer itself (so an OrtValue aliases it), or, for a blocked32 input that
    :func:`graph_with_initializers` renamed, its transposed ``(in, out)`` copy under the new
    name."""
    return {renamed.get(n, n): transposed_from_blocked(v) if n in renamed else v
            for n, v in values.items()}


def add_constant_initializers(so, values: Mapping[str, np.ndarray], renamed: Mapping[str, str]
                              ) -> list:
    """Supply :func:`constant_values` to ``so`` with ``add_initializer``; returns the OrtValues,
    which must outlive the session (it may read the unpacked initializers)."""
    rt = require_ort()
    kept = []
    for name, arr in constant_values(values, renamed).items():
        ov = rt.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr))
        so.add_initializer(name, ov)
        kept.append(ov)
    return kept
