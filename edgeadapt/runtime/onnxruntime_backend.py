"""ONNX Runtime weight stores (numpy only, no torch unless CUDA buffers are bound through it).

The bundle's ONNX graph has the *live* weights (those adapters may touch) as graph inputs; every
other weight is a constant initializer that ONNX Runtime prepacks. Three stores:

- :class:`OrtLiveStore` (CPU, ``mode="live"``): the runtime owns one numpy buffer per live
  weight, wraps it once in an aliasing ``OrtValue`` and binds it to every IOBinding it makes;
  the engine edits the buffer in place, the next run reads it. ``commit`` is a no-op.
- :class:`OrtRepackStore` (``mode="repack"``): the live weights are turned back into
  initializers supplied with ``SessionOptions.add_initializer`` (aliasing the host buffers), so
  every weight is prepacked; ``commit`` re-creates the session (packing once per switch).
- :class:`OrtDeviceStore` (``device="cuda"``): host mirrors for the engine, device buffers bound
  by pointer; ``commit`` copies the changed values to the device and synchronises (its
  ``device="cpu"`` stand-in runs the same code on the CPU execution provider, for tests).

Prepacking ignores later edits of a packed buffer (docs/runtime.md), which is why live weights
are graph inputs and repack rebuilds.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from edgeadapt.errors import BundleError, ConfigError, MissingPackageError
from edgeadapt.format.layout import BLOCKED, backend_shape, to_backend, transposed_from_blocked
from edgeadapt.format.manifest import Manifest
from edgeadapt.runtime.pages import arena_copies
from edgeadapt.runtime.store import LiveWeight, WeightStore

try:
    import onnxruntime as ort
except ImportError:  # pragma: no cover - exercised only where onnxruntime is absent
    ort = None

_NP_DTYPES = {"int64": np.int64, "int32": np.int32, "float32": np.float32, "float16": np.float16,
              "bool": np.bool_}


def _require_ort():
    if ort is None:
        raise MissingPackageError("onnxruntime is not installed: pip install onnxruntime")
    return ort


def session_options(threads: int | None, extra: dict[str, str] | None = None):
    """Options for every session: spinning stopped when idle (several sessions in a process),
    ``threads`` intra-op threads (None: ONNX Runtime's default), prepacking left on."""
    so = _require_ort().SessionOptions()
    so.add_session_config_entry("session.force_spinning_stop", "1")
    if threads is not None:
        so.intra_op_num_threads = int(threads)
    for k, v in (extra or {}).items():
        so.add_session_config_entry(k, v)
    return so


def read_live_weights(bundle_dir: Path, manifest: Manifest, section: dict | None = None,
                      weights: dict | None = None) -> dict[str, LiveWeight]:
    """Runtime-owned, writable copies of the live weights in their ONNX layout, carved from one
    allocation (:func:`edgeadapt.runtime.pages.arena_copies`: huge pages for the switch).

    section: the manifest's "onnx" section (or a variant's); weights: per torch name the
    {"name", "layout"} entries (default: the manifest's). Tensors in the live-weights
    safetensors file may be keyed by graph input name or torch name, in the backend layout or
    in torch layout (out, in).
    """
    from safetensors.numpy import load_file  # torch-free

    section = manifest.onnx if section is None else section
    if not section or "live_weights" not in section:
        raise BundleError(f"{bundle_dir}: bundle.json has no onnx live_weights file")
    path = bundle_dir / section["live_weights"]
    try:
        tensors = load_file(str(path))
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: cannot read the live weights: {exc}") from None
    arrays, specs = {}, {}
    for name, entry in manifest.weights.items():
        onnx = (weights or {}).get(name, {}).get("onnx") if weights else entry.onnx
        if onnx is None:
            raise BundleError(f"{bundle_dir}: weight {name!r} has no onnx entry in bundle.json")
        arr = tensors.get(onnx["name"], tensors.get(name))
        if arr is None:
            raise BundleError(f"{path}: no tensor for live weight {name!r} ({onnx['name']!r})")
        try:
            want = backend_shape(tuple(entry.shape), onnx["layout"])
        except ConfigError as exc:
            raise BundleError(f"{path}: live weight {name!r}: {exc}") from None
        if arr.shape != want and arr.shape == tuple(entry.shape):  # stored in torch layout
            arr = to_backend(arr, onnx["layout"])
        if arr.shape != want:
            raise BundleError(f"{path}: live weight {name!r} has shape {arr.shape}, "
                              f"expected {want}")
        arrays[name], specs[name] = arr, (onnx["layout"], entry.shape, entry.sha256)
    # one huge-page-backed allocation for all of them (pages.arena_copies)
    return {name: LiveWeight(name, buf, *specs[name])
            for name, buf in arena_copies(arrays).items()}


class _OrtStoreBase(WeightStore):
    """Shared input handling: names and dtypes from bundle.json, first graph output returned."""

    def __init__(self, model_path: Path, live: dict[str, LiveWeight], inputs: list[dict],
                 input_names: dict[str, str]) -> None:
        self.model_path = model_path
        self._live = live
        self._input_specs = {i["name"]: i for i in inputs}
        self.graph_names = input_names  # torch name -> graph input/initializer name

    def live_weights(self) -> dict[str, LiveWeight]:
        return self._live

    def _feeds(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The model inputs in their graph dtypes (checked by ``Runtime.run`` before:
        :func:`edgeadapt.runtime.inputs.check_inputs`)."""
        feeds = {}
        for name, x in inputs.items():
            dt = _NP_DTYPES.get(self._input_specs.get(name, {}).get("dtype", ""))
            feeds[name] = np.ascontiguousarray(x, dtype=dt)
        return feeds


class OrtLiveStore(_OrtStoreBase):
    """CPU live mode: live weights are graph inputs bound once per IOBinding to runtime-owned
    buffers (aliasing OrtValues); one IOBinding per calling thread. ``kernel``: blocked32 live
    weights are read by edgeadapt's own kernel (:func:`cpu_session`); ``self.kernel`` says
    whether any was."""

    mode = "live"

    def __init__(self, model_path: Path, live: dict[str, LiveWeight], inputs: list[dict],
                 input_names: dict[str, str], threads: int | None = None,
                 extra_inputs: dict[str, np.ndarray] | None = None, kernel: bool = False
                 ) -> None:
        super().__init__(model_path, live, inputs, input_names)
        rt = _require_ort()
        self.session, self.kernel = cpu_session(
            model_path, session_options(threads),
            [input_names[n] for n, lw in live.items() if lw.layout == BLOCKED], kernel)
        self.output_name = self.session.get_outputs()[0].name
        graph_inputs = {i.name for i in self.session.get_inputs()}
        missing = sorted(n for n in input_names.values() if n not in graph_inputs)
        if missing:
            raise BundleError(f"{model_path}: live weights {missing} are not graph inputs")
        # Never rebind: these OrtValues alias the buffers the engine edits.
        self._values = {input_names[n]: rt.OrtValue.ortvalue_from_numpy(lw.array)
                        for n, lw in live.items()}
        self.extra_inputs = extra_inputs if extra_inputs is not None else {}
        self._extra_values = {k: rt.OrtValue.ortvalue_from_numpy(v)
                              for k, v in self.extra_inputs.items()}
        self._local = threading.local()

    def _binding(self):
        b = getattr(self._local, "binding", None)
        if b is None:
            b = self.session.io_binding()
            for name, value in {**self._values, **self._extra_values}.items():
                b.bind_ortvalue_input(name, value)
            self._local.binding = b
        return b

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return run_bound(self.session, self._binding(), self._feeds(inputs), self.output_name)


def cpu_session(model_path: Path, so, blocked: list[str], kernel: bool) -> tuple[object, bool]:
    """(a CPU session over ``model_path`` built with options ``so``, whether it uses the kernel).

    kernel: replace every reader of the blocked32 graph inputs ``blocked`` by edgeadapt's own
    ``edgeadapt.BlockedMatMul`` (:func:`edgeadapt.export.onnx_blocked.kernel_blocked_matmuls`;
    the library from :mod:`edgeadapt.runtime.onnxruntime_kernel`, which must be loadable),
    which reads them in place instead of through MatMul's per-call copy of each B panel
    (docs/bench.md). The rewritten graph is handed over as bytes, its external data read from
    the model's folder.
    """
    if kernel and blocked:
        from edgeadapt.export.onnx_blocked import kernel_blocked_matmuls
        from edgeadapt.runtime import onnxruntime_kernel

        model = _graph(model_path)
        if kernel_blocked_matmuls(model, blocked):
            onnxruntime_kernel.register(so)
            so.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                        str(model_path.parent))
            return _session(model.SerializeToString(), so, model_path), True
    return _session(str(model_path), so, model_path), False


def _session(source: str | bytes, so, model_path: Path, providers: Sequence = (
        "CPUExecutionProvider",)):
    """An InferenceSession of ``source`` (a path, or the graph as bytes); BundleError naming
    ``model_path`` where ONNX Runtime cannot load it (a corrupt or truncated file, missing
    external data): its own errors are untyped."""
    try:
        return _require_ort().InferenceSession(source, so, providers=list(providers))
    except Exception as exc:  # onnxruntime's pybind errors (InvalidProtobuf, Fail, ...)
        raise BundleError(f"{model_path}: ONNX Runtime cannot load this graph: {exc}") from exc


def _graph(model_path: Path):
    """The ONNX graph at ``model_path`` without its external data; BundleError if it cannot be
    read or parsed."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        return onnx.load(str(model_path), load_external_data=False)
    except (OSError, DecodeError, ValueError) as exc:
        raise BundleError(f"{model_path}: not a readable ONNX graph: {exc}") from exc


def use_kernel(kernel: bool | None, layouts: Iterable[str]) -> bool:
    """Whether a CPU live session reads its blocked32 live weights (``layouts``: those of the
    live weights) with edgeadapt's own kernel: ``kernel`` None where the kernel can be built
    and loaded here (:func:`edgeadapt.runtime.onnxruntime_kernel.unavailable`), True always
    (ConfigError if it cannot be), False never. False without blocked32 live weights."""
    from edgeadapt.runtime import onnxruntime_kernel

    if kernel is False or BLOCKED not in set(layouts):
        return False
    if kernel is None:
        return onnxruntime_kernel.unavailable() is None
    onnxruntime_kernel.load()
    return True


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


def _graph_with_initializers(model_path: Path, names: list[str]) -> tuple[bytes, dict[str, str]]:
    """The model with the given graph inputs turned into (placeholder) initializers; the
    placeholders are overridden with ``add_initializer`` at every session build.

    A blocked32 input (3-D) is first turned back into a ``(in, out)`` one read by a plain MatMul
    (:func:`edgeadapt.export.onnx_blocked.unblock_live_matmuls`), because ONNX Runtime prepacks
    only 2-D MatMul weights. Returns (model bytes, {blocked input name: its transposed name});
    supply the values with :func:`add_constant_initializers`."""
    from onnx import numpy_helper

    from edgeadapt.export.onnx_blocked import unblock_live_matmuls

    model = _graph(model_path)
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
    :func:`_graph_with_initializers` renamed, its transposed ``(in, out)`` copy under the new
    name."""
    return {renamed.get(n, n): transposed_from_blocked(v) if n in renamed else v
            for n, v in values.items()}


def add_constant_initializers(so, values: Mapping[str, np.ndarray], renamed: Mapping[str, str]
                              ) -> list:
    """Supply :func:`constant_values` to ``so`` with ``add_initializer``; returns the OrtValues,
    which must outlive the session (it may read the unpacked initializers)."""
    rt = _require_ort()
    kept = []
    for name, arr in constant_values(values, renamed).items():
        ov = rt.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr))
        so.add_initializer(name, ov)
        kept.append(ov)
    return kept


class OrtRepackStore(_OrtStoreBase):
    """Repack mode: every weight an initializer, prepacked; ``commit`` rebuilds the session.

    Memory: the host copy of the live weights, the model proto with placeholders, and ONNX
    Runtime's packed weights. The old session is replaced under the engine's exclusive lock.
    """

    mode = "repack"

    def __init__(self, model_path: Path, live: dict[str, LiveWeight], inputs: list[dict],
                 input_names: dict[str, str], threads: int | None = None) -> None:
        super().__init__(model_path, live, inputs, input_names)
        self.threads = threads
        self._proto, self._renamed = _graph_with_initializers(
            model_path, [input_names[n] for n in live])
        self.rebuilds = 0
        self.session = self._build()
        self.output_name = self.session.get_outputs()[0].name

    def _build(self):
        so = session_options(self.threads, {
            "session.model_external_initializers_file_folder_path":
                str(self.model_path.parent)})
        values = add_constant_initializers(
            so, {self.graph_names[n]: lw.array for n, lw in self._live.items()}, self._renamed)
        session = _session(self._proto, so, self.model_path)
        self._keep = values  # the session may read the unpacked initializers
        return session

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run([self.output_name], self._feeds(inputs))[0]

    def commit(self, changes: dict[str, np.ndarray | None]) -> None:
        if changes:
            self.session = self._build()
            self.rebuilds += 1


class OrtDeviceStore(_OrtStoreBase):
    """Live mode on an execution provider with its own memory: device buffers bound by pointer,
    host mirrors (the :class:`LiveWeight` arrays) are what the engine edits.

    ``device="cuda"`` is the CUDA execution provider. ``device="cpu"`` runs the same code on the
    CPU execution provider with the "device" buffers as separate host copies: it is how the
    binding and commit logic is tested on machines without a GPU (the outputs only follow a
    switch if ``commit`` really moved the changes into the bound buffers).

    With torch importable (and, for CUDA, seeing a GPU) the device buffers are torch tensors
    bound with ``bind_input(buffer_ptr=...)`` and a sparse change is one indexed copy on the
    device: ``dev.view(-1)[idx] = host.reshape(-1)[idx]``; without torch they are OrtValues
    refreshed whole with ``update_inplace``; ``use_torch`` forces one or the other (None: torch
    when available, unless ``EDGEADAPT_NO_TORCH`` is set). Memory: the host mirror plus the
    device copy of every live weight.
    """

    mode = "live"

    def __init__(self, model_path: Path, live: dict[str, LiveWeight], inputs: list[dict],
                 input_names: dict[str, str], threads: int | None = None,
                 device_id: int = 0, device: str = "cuda", use_torch: bool | None = None
                 ) -> None:
        super().__init__(model_path, live, inputs, input_names)
        rt = _require_ort()
        if device not in ("cuda", "cpu"):
            raise ConfigError(f"device {device!r}: choose 'cuda' or 'cpu'")
        provider = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
        if provider not in rt.get_available_providers():
            raise MissingPackageError("device='cuda' needs onnxruntime-gpu with the CUDA "
                                      "execution provider")
        self.device, self.device_id = device, device_id
        providers = ([("CUDAExecutionProvider", {"device_id": device_id})]
                     if device == "cuda" else []) + ["CPUExecutionProvider"]
        self.session = _session(str(model_path), session_options(threads), model_path,
                                providers)
        if self.session.get_providers()[0] != provider:
            raise MissingPackageError("the CUDA execution provider failed to start (CUDA 13 / "
                                      "cuDNN 9 libraries missing?)")
        self.output_name = self.session.get_outputs()[0].name
        self._torch = _try_import_torch(device) if use_torch is None else \
            _require_torch(device) if use_torch else None
        where = f"cuda:{device_id}" if device == "cuda" else "cpu"
        self._device: dict[str, object] = {}
        for n, lw in live.items():
            if self._torch is not None:  # torch.tensor copies, also on the CPU
                self._device[n] = self._torch.tensor(lw.array, device=where)
            else:
                self._device[n] = rt.OrtValue.ortvalue_from_numpy(lw.array.copy(), device,
                                                                  device_id)
        self._local = threading.local()

    def device_array(self, name: str) -> np.ndarray:
        """A host copy of the device buffer of live weight ``name`` (for checks)."""
        dev = self._device[name]
        return dev.cpu().numpy().copy() if self._torch is not None else dev.numpy().copy()

    def _binding(self):
        b = getattr(self._local, "binding", None)
        if b is None:
            b = self.session.io_binding()
            for n, dev in self._device.items():
                if self._torch is not None:
                    b.bind_input(self.graph_names[n], self.device, self.device_id, np.float32,
                                 list(dev.shape), dev.data_ptr())
                else:
                    b.bind_ortvalue_input(self.graph_names[n], dev)
            self._local.binding = b
        return b

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        b = self._binding()
        for name, x in self._feeds(inputs).items():
            b.bind_cpu_input(name, x)
        b.bind_output(self.output_name, self.device, self.device_id)
        b.synchronize_inputs()
        self.session.run_with_iobinding(b)
        out = b.copy_outputs_to_cpu()[0]
        b.clear_binding_outputs()
        return out

    def commit(self, changes: dict[str, np.ndarray | None]) -> None:
        torch = self._torch
        for n, idx in changes.items():
            host = self._live[n].array
            dev = self._device[n]
            if torch is None:
                dev.update_inplace(host)
            elif idx is None:
                dev.copy_(torch.from_numpy(host))
            else:
                flat = dev.view(-1)
                i = torch.from_numpy(idx).to(flat.device)
                flat[i] = torch.from_numpy(host.reshape(-1)[idx]).to(flat.device)
        if torch is not None and self.device == "cuda":
            torch.cuda.synchronize(self.device_id)


def _try_import_torch(device: str):
    """torch, if importable, not disabled by ``EDGEADAPT_NO_TORCH`` and (for CUDA) seeing a GPU."""
    if os.environ.get("EDGEADAPT_NO_TORCH"):
        return None
    try:
        import torch
    except ImportError:
        return None
    return torch if device == "cpu" or torch.cuda.is_available() else None


def _require_torch(device: str):
    torch = _try_import_torch(device)
    if torch is None:
        raise MissingPackageError(f"use_torch=True on device {device!r} needs torch"
                                  + (" with CUDA" if device == "cuda" else ""))
    return torch


def _bundle_parts(bundle_dir: Path, manifest: Manifest
                  ) -> tuple[Path, dict[str, LiveWeight], dict[str, str]]:
    """(ONNX model path, live weights, torch name -> graph input name) of a bundle."""
    section = manifest.onnx
    if not section or "file" not in section:
        raise BundleError(f"{bundle_dir}: bundle.json has no onnx section; export with "
                          "--formats onnx")
    model_path = bundle_dir / section["file"]
    if not model_path.is_file():
        raise BundleError(f"{model_path}: the bundle's ONNX model is missing")
    live = read_live_weights(bundle_dir, manifest)
    return model_path, live, {n: manifest.weights[n].onnx["name"] for n in live}


def open_cuda_standin(bundle_dir: Path, manifest: Manifest, use_torch: bool,
                      threads: int | None = 1) -> OrtDeviceStore:
    """The CUDA store's code on the CPU execution provider (``OrtDeviceStore(device="cpu")``),
    for checks where there is no GPU; see :func:`edgeadapt.runtime.api.load_cuda_standin`."""
    model_path, live, names = _bundle_parts(bundle_dir, manifest)
    return OrtDeviceStore(model_path, live, manifest.inputs, names, threads, device="cpu",
                          use_torch=use_torch)


def open_store(bundle_dir: Path, manifest: Manifest, device: str = "cpu", mode: str = "live",
               threads: int | None = None, kernel: bool | None = None) -> WeightStore:
    """The ONNX Runtime store for ``bundle_dir``: live or repack on CPU, live on CUDA.
    kernel: CPU live mode reads blocked32 live weights with edgeadapt's own kernel
    (:func:`use_kernel`: None where it can be built)."""
    model_path, live, names = _bundle_parts(bundle_dir, manifest)
    if device == "cuda":
        if mode != "live":
            raise ConfigError("device='cuda' supports mode='live' only (cuBLAS reads raw "
                              "weights, so there is nothing to repack)")
        return OrtDeviceStore(model_path, live, manifest.inputs, names, threads)
    if device != "cpu":
        raise ConfigError(f"device {device!r}: choose 'cpu' or 'cuda'")
    if mode == "live":
        return OrtLiveStore(model_path, live, manifest.inputs, names, threads,
                            kernel=use_kernel(kernel, (lw.layout for lw in live.values())))
    if mode == "repack":
        return OrtRepackStore(model_path, live, manifest.inputs, names, threads)
    raise ConfigError(f"mode {mode!r}: choose 'live' or 'repack'")
