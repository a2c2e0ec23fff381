"""ONNX Runtime weight stores on the CPU (numpy + onnxruntime, no torch).

The bundle's ONNX graph has the *live* weights (those adapters may touch) as graph inputs; every
other weight is a constant initializer that ONNX Runtime prepacks. Three stores:

- :class:`OrtLiveStore` (CPU, ``mode="live"``): the runtime owns one numpy buffer per live
  weight, wraps it once in an aliasing ``OrtValue`` and binds it to every IOBinding it makes;
  the engine edits the buffer in place, the next run reads it. ``commit`` is a no-op.
- :class:`OrtRepackStore` (``mode="repack"``): the live weights are turned back into
  initializers supplied with ``SessionOptions.add_initializer`` (aliasing the host buffers), so
  every weight is prepacked; ``commit`` re-creates the session (packing once per switch).
- :class:`~edgeadapt.runtime.backends.onnxruntime.cuda.OrtDeviceStore` (``device="cuda"``,
  in ``cuda.py``): host mirrors for the engine, device buffers bound by pointer; ``commit``
  copies the changed values to the device and synchronises.

Prepacking ignores later edits of a packed buffer (docs/runtime.md), which is why live weights
are graph inputs and repack rebuilds.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from edgeadapt.errors import BundleError, ConfigError
from edgeadapt.format import nibbles
from edgeadapt.format.layout import BLOCKED, backend_shape, to_backend, to_torch
from edgeadapt.format.manifest import Manifest
from edgeadapt.format.quant import grid as quant_grid
from edgeadapt.runtime.backends.onnxruntime.kernel import use_kernel
from edgeadapt.runtime.backends.onnxruntime.session import (
    add_constant_initializers,
    graph_with_initializers,
    live_session,
    open_session,
    run_bound,
    session_options,
    thread_binding,
)
from edgeadapt.runtime.pages import arena_copies
from edgeadapt.runtime.store import Codes, LiveWeight, WeightStore

_NP_DTYPES = {"int64": np.int64, "int32": np.int32, "float32": np.float32, "float16": np.float16,
              "bool": np.bool_}


def read_live_weights(bundle_dir: Path, manifest: Manifest, section: dict | None = None,
                      weights: dict | None = None, pack: bool = False
                      ) -> dict[str, LiveWeight]:
    """Runtime-owned, writable copies of the live weights in their ONNX layout, carved from one
    allocation (:func:`edgeadapt.runtime.pages.arena_copies`: huge pages for the switch).

    section: the manifest's "onnx" section (or a variant's); weights: per torch name the
    {"name", "layout"} entries (default: the manifest's). Tensors in the live-weights
    safetensors file may be keyed by graph input name or torch name, in the backend layout or
    in torch layout (out, in). pack: every int4 blocked32 weight's codes packed two per byte
    (:func:`_packs`) before the copy, so the arena holds them packed and only so.
    """
    from safetensors.numpy import load_file  # torch-free

    section = manifest.onnxruntime if section is None else section
    if not section or "live_weights" not in section:
        raise BundleError(f"{bundle_dir}: bundle.json has no onnx live_weights file")
    path = bundle_dir / section["live_weights"]
    try:
        tensors = load_file(str(path))
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: cannot read the live weights: {exc}") from None
    arrays, specs = {}, {}
    for name, entry in manifest.weights.items():
        onnx = (weights or {}).get(name, {}).get("onnxruntime") if weights else entry.onnxruntime
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
        codes = _codes(path, name, onnx, entry.shape, tensors) if "quant" in onnx else None
        if (codes is None) != (arr.dtype != np.int8):
            raise BundleError(f"{path}: live weight {name!r} is {arr.dtype}, but bundle.json "
                              f"says it is {'quantized' if codes else 'float'}")
        packed = pack and _packs(codes, onnx["layout"])
        arrays[name] = nibbles.pack(arr) if packed else arr
        specs[name] = (onnx["layout"], entry.shape, entry.sha256, codes, packed)
    # one huge-page-backed allocation for all of them (pages.arena_copies)
    return {name: LiveWeight(name, buf, *specs[name])
            for name, buf in arena_copies(arrays).items()}


def _packs(codes: Codes | None, layout: str) -> bool:
    """Whether a live weight is held as int4 codes two per byte
    (:mod:`edgeadapt.format.nibbles`): int4 codes in the blocked32 layout, what edgeadapt's
    kernel reads (``edgeadapt.Q4BlockedMatMul``), half the bytes per forward of a code per
    byte."""
    return codes is not None and codes.grid.bits == 4 and layout == BLOCKED


def _live_layouts(manifest: Manifest) -> list[str | None]:
    """The ONNX layout of every live weight, from bundle.json (None where it has no entry:
    :func:`read_live_weights` refuses it)."""
    return [(entry.onnxruntime or {}).get("layout") for entry in manifest.weights.values()]


def _codes(path: Path, name: str, onnx: dict, shape: tuple[int, int],
           tensors: dict[str, np.ndarray]) -> Codes:
    """The grid and scales of quantized live weight ``name`` (its bundle entry ``onnx``);
    BundleError for an unknown grid or scales that are missing, misshapen, zero or NaN."""
    quant = onnx["quant"]
    try:
        grid = quant_grid(quant.get("grid", ""))
        held = tensors.get(quant.get("scales", ""))
        if held is None:
            raise ConfigError(f"no scales tensor {quant.get('scales')!r}")
        sshape = grid.scales_shape(shape)
        scales = to_torch(held, sshape, onnx["layout"]).astype(np.float32)
        grid.check_scales(scales, shape, "scales")
    except ConfigError as exc:
        raise BundleError(f"{path}: quantized live weight {name!r}: {exc}") from None
    return Codes(grid, np.ascontiguousarray(scales), quant["scales"],
                 np.ascontiguousarray(held, dtype=np.float32), quant.get("codes_sha256"))


class OrtStoreBase(WeightStore):
    """Shared input handling: names and dtypes from bundle.json, first graph output returned."""

    def __init__(self, model_path: Path, live: dict[str, LiveWeight], inputs: list[dict],
                 input_names: dict[str, str]) -> None:
        self.model_path = model_path
        self._live = live
        self._input_specs = {i["name"]: i for i in inputs}
        self.graph_names = input_names  # torch name -> graph input/initializer name

    def live_weights(self) -> dict[str, LiveWeight]:
        return self._live

    def prepare_inputs(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The model inputs in their graph dtypes (checked by ``Runtime.run`` before:
        :func:`edgeadapt.runtime.inputs.check_inputs`); the variant sessions feed them so too."""
        feeds = {}
        for name, x in inputs.items():
            dt = _NP_DTYPES.get(self._input_specs.get(name, {}).get("dtype", ""))
            feeds[name] = np.ascontiguousarray(x, dtype=dt)
        return feeds


class OrtLiveStore(OrtStoreBase):
    """CPU live mode: live weights are graph inputs bound once per IOBinding to runtime-owned
    buffers (aliasing OrtValues); one IOBinding per calling thread. ``kernel``: blocked32 live
    weights are read by edgeadapt's own kernel
    (:func:`~edgeadapt.runtime.backends.onnxruntime.session.cpu_session`); ``self.kernel`` says
    whether any was."""

    mode = "live"

    def __init__(self, model_path: Path, live: dict[str, LiveWeight], inputs: list[dict],
                 input_names: dict[str, str], threads: int | None = None, kernel: bool = False
                 ) -> None:
        super().__init__(model_path, live, inputs, input_names)
        self.session, self.kernel, self._values = live_session(
            model_path, session_options(threads), live, input_names, kernel)
        self.output_name = self.session.get_outputs()[0].name
        self._local = threading.local()

    def _binding(self):
        return thread_binding(self._local, self.session, self._values)

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return run_bound(self.session, self._binding(), self.prepare_inputs(inputs),
                         self.output_name)


class OrtRepackStore(OrtStoreBase):
    """Repack mode: every weight an initializer, prepacked; ``commit`` rebuilds the session.

    Memory: the host copy of the live weights, the model proto with placeholders, and ONNX
    Runtime's packed weights. The old session is replaced under the engine's exclusive lock.
    """

    mode = "repack"

    def __init__(self, model_path: Path, live: dict[str, LiveWeight], inputs: list[dict],
                 input_names: dict[str, str], threads: int | None = None) -> None:
        super().__init__(model_path, live, inputs, input_names)
        self.threads = threads
        self._proto, self._renamed = graph_with_initializers(
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
        session = open_session(self._proto, so, self.model_path)
        self._keep = values  # the session may read the unpacked initializers
        return session

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run([self.output_name], self.prepare_inputs(inputs))[0]

    def commit(self, changes: dict[str, np.ndarray | None]) -> None:
        if changes:
            self.session = self._build()
            self.rebuilds += 1


def bundle_parts(bundle_dir: Path, manifest: Manifest, pack: bool = False
                 ) -> tuple[Path, dict[str, LiveWeight], dict[str, str]]:
    """(ONNX model path, live weights, torch name -> graph input name) of a bundle; pack: int4
    blocked32 codes two per byte (:func:`read_live_weights`)."""
    section = manifest.onnxruntime
    if not section or "file" not in section:
        raise BundleError(f"{bundle_dir}: bundle.json has no onnxruntime section; export "
                          "with --backends onnxruntime")
    model_path = bundle_dir / section["file"]
    if not model_path.is_file():
        raise BundleError(f"{model_path}: the bundle's ONNX model is missing")
    live = read_live_weights(bundle_dir, manifest, pack=pack)
    return model_path, live, {n: manifest.weights[n].onnxruntime["name"] for n in live}


def open_store(bundle_dir: Path, manifest: Manifest, device: str = "cpu", mode: str = "live",
               threads: int | None = None, kernel: bool | None = None) -> WeightStore:
    """The ONNX Runtime store for ``bundle_dir``: live or repack on CPU, live on CUDA
    (:mod:`edgeadapt.runtime.backends.onnxruntime.cuda`). kernel: CPU live mode reads blocked32
    live weights with edgeadapt's own kernel (:func:`use_kernel`: None where it can be built)."""
    quantized = (manifest.onnxruntime or {}).get("precision", "fp32") != "fp32"
    if quantized and (device != "cpu" or mode != "live"):
        raise ConfigError(f"a quantized bundle ({manifest.onnxruntime['precision']}) runs "
                          "with device='cpu', mode='live' only (its codes are read by "
                          "edgeadapt's kernel in place)")
    if device == "cuda":
        if mode != "live":
            raise ConfigError("device='cuda' supports mode='live' only (cuBLAS reads raw "
                              "weights, so there is nothing to repack)")
        from edgeadapt.runtime.backends.onnxruntime.cuda import OrtDeviceStore

        model_path, live, names = bundle_parts(bundle_dir, manifest)
        return OrtDeviceStore(model_path, live, manifest.inputs, names, threads)
    if device != "cpu":
        raise ConfigError(f"device {device!r}: choose 'cpu' or 'cuda'")
    if mode not in ("live", "repack"):
        raise ConfigError(f"mode {mode!r}: choose 'live' or 'repack'")
    if mode == "live":
        kernel = use_kernel(kernel, _live_layouts(manifest))
        model_path, live, names = bundle_parts(bundle_dir, manifest, pack=kernel)
        return OrtLiveStore(model_path, live, manifest.inputs, names, threads, kernel=kernel)
    model_path, live, names = bundle_parts(bundle_dir, manifest)
    return OrtRepackStore(model_path, live, manifest.inputs, names, threads)
