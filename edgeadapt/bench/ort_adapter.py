"""The ONNX Runtime peer: its own LoRA adapter API on the bundle's LoRA branch variant graph.

ONNX Runtime (>= 1.20) runs LoRA unfused: the LoRA tensors are extra graph inputs, written to an
``.onnx_adapter`` file (``onnxruntime.AdapterFormat``), memory-mapped (``LoraAdapter.Load``) and
fed per run through ``RunOptions.add_active_adapter``. The base weights stay constant and
prepacked: the variant graph's live-weight inputs are turned back into initializers supplied
with ``SessionOptions.add_initializer`` (as the runtime's repack store does). A "switch" is
building the RunOptions of the next adapter; nothing in the session changes.

Branch math (edgeadapt.export.onnx_branch, LoRA layer with alpha = r): ``y = W0 x + B (A x)``,
so our LoraDelta's A (r, in) and B (out, r, alpha / r folded in) are fed as they are.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from edgeadapt.errors import BundleError, MissingPackageError
from edgeadapt.format.types import Adapter, LoraDelta


def _ort():
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise MissingPackageError("the ort-adapter peer needs onnxruntime") from exc
    if not hasattr(ort, "AdapterFormat"):
        raise MissingPackageError("the ort-adapter peer needs onnxruntime >= 1.20 (AdapterFormat)")
    return ort


def onnx_load_errors(ort_names: tuple[str, ...] = ("Fail", "InvalidProtobuf", "InvalidGraph",
                                                   "NoSuchFile")
                     ) -> tuple[type[BaseException], ...]:
    """What reading a corrupt ONNX file raises, where those packages are installed: protobuf's
    DecodeError and the ONNX Runtime error classes named in ``ort_names``."""
    errors: list[type[BaseException]] = []
    try:
        from google.protobuf.message import DecodeError

        errors.append(DecodeError)
    except ImportError:
        pass
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as state

        errors.extend(getattr(state, n) for n in ort_names if hasattr(state, n))
    except ImportError:
        pass
    return tuple(errors)


def write_ort_adapter(path: str | os.PathLike, adapter: Adapter,
                      branch_inputs: Mapping[str, Mapping[str, str]]) -> Path:
    """Write ``adapter`` (LoRA / pruned SoRA) as an ``.onnx_adapter`` file, atomically.

    branch_inputs: torch weight name -> {"A": graph input name, "B": graph input name}, from the
    bundle's LoRA variant section. Returns the path written.
    """
    params = {}
    for weight, delta in adapter.targets.items():
        if not isinstance(delta, LoraDelta):
            raise BundleError(f"{weight}: ONNX Runtime's adapter API drives LoRA deltas only")
        names = branch_inputs.get(weight)
        if names is None:
            raise BundleError(f"{weight}: the LoRA variant graph has no branch on this weight")
        params[names["A"]] = delta.A
        params[names["B"]] = delta.B
    return write_adapter_params(path, params)


def write_adapter_params(path: str | os.PathLike, params: Mapping[str, np.ndarray]) -> Path:
    """Write ``params`` (graph input name -> tensor: float, cast to float32, or the uint8 of
    packed quantized weights, kept) as an ``.onnx_adapter`` file (``onnxruntime.
    AdapterFormat``, adapter and model version 1), atomically; returns the path."""
    ort = _ort()
    values = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(
        v, dtype=v.dtype if v.dtype == np.uint8 else np.float32)) for name, v in params.items()}
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters(values)
    out = Path(path)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        fmt.export_adapter(tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


class OrtBranchSession:
    """A CPU session of a branch variant graph (LoRA or SiRA), base weights prepacked.

    Branch tensors are fed either as ordinary inputs (``run(inputs, branch)``: our unfused
    variants) or, for LoRA, from an ``.onnx_adapter`` through ONNX Runtime's adapter API
    (``activate(load(path))`` then ``run(inputs)``: the ort-lora-adapter peer).

    model_path: the variant ``.onnx`` file; live_values: graph input name -> base value (backend
    layout) of every live-weight input, turned into prepacked initializers.
    """

    def __init__(self, model_path: Path, live_values: Mapping[str, np.ndarray],
                 threads: int | None = 1) -> None:
        from edgeadapt.runtime.backends.onnxruntime.session import (
            add_constant_initializers,
            graph_with_initializers,
            session_options,
        )

        ort = _ort()
        so = session_options(threads, {
            "session.model_external_initializers_file_folder_path": str(model_path.parent)})
        so.log_severity_level = 3  # the branch inputs' zero defaults make ORT warn per input
        proto, renamed = graph_with_initializers(model_path, list(live_values))
        self._values = add_constant_initializers(so, live_values, renamed)
        self.session = ort.InferenceSession(proto, so, providers=["CPUExecutionProvider"])
        self.output_name = self.session.get_outputs()[0].name
        self.run_options = ort.RunOptions()
        self.active_adapter = None

    def load(self, path: str | os.PathLike):
        """Memory-map an ``.onnx_adapter`` file."""
        adapter = _ort().LoraAdapter()
        adapter.Load(str(path))
        return adapter

    def activate(self, adapter) -> None:
        """Make ``adapter`` (from :meth:`load`, or None for the base) the one used by runs."""
        ro = _ort().RunOptions()
        if adapter is not None:
            ro.add_active_adapter(adapter)
        self.active_adapter = adapter  # RunOptions does not keep the adapter alive
        self.run_options = ro

    def run(self, inputs: Mapping[str, np.ndarray],
            branch: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """One forward; ``branch``: graph input name -> tensor (else the active adapter's, or
        the graph's all-zero defaults)."""
        if branch:
            return self.session.run([self.output_name], {**inputs, **branch})[0]
        return self.session.run([self.output_name], dict(inputs), self.run_options)[0]


def branch_feeds(adapter: Adapter, branch_inputs: Mapping[str, Mapping[str, str]]
                 ) -> dict[str, np.ndarray]:
    """Graph input name -> tensor for an unfused adapter (LoRA: A, B; SiRA: router, A, B)."""
    feeds = {}
    for weight, delta in adapter.targets.items():
        names = branch_inputs.get(weight)
        if names is None:
            raise BundleError(f"{weight}: the variant graph has no branch on this weight")
        for key, input_name in names.items():
            value = getattr(delta, key, None)
            if value is None:
                raise BundleError(f"{weight}: a {type(delta).__name__} has no {key!r}")
            feeds[input_name] = np.ascontiguousarray(value, dtype=np.float32)
    return feeds
