"""The ONNX Runtime store for execution providers with their own memory (CUDA), numpy only
unless torch binds the device buffers.

:class:`OrtDeviceStore` keeps host mirrors (what the engine edits) and device buffers bound by
pointer; ``commit`` copies the changed values to the device and synchronises. Its
``device="cpu"`` stand-in (:func:`open_cuda_standin`) runs the same code on the CPU execution
provider with the "device" buffers as separate host copies, so the binding and commit logic is
tested on machines without a GPU (tests/cuda_standin.py, scripts/cuda_check.py ``--standin``).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from edgeadapt.errors import ConfigError, MissingPackageError
from edgeadapt.format.manifest import Manifest
from edgeadapt.runtime.backends.onnxruntime.session import (
    open_session,
    require_ort,
    session_options,
    thread_binding,
)
from edgeadapt.runtime.backends.onnxruntime.store import OrtStoreBase, bundle_parts
from edgeadapt.runtime.store import LiveWeight


class OrtDeviceStore(OrtStoreBase):
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
        rt = require_ort()
        if device not in ("cuda", "cpu"):
            raise ConfigError(f"device {device!r}: choose 'cuda' or 'cpu'")
        provider = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
        if provider not in rt.get_available_providers():
            raise MissingPackageError("device='cuda' needs onnxruntime-gpu with the CUDA "
                                      "execution provider")
        self.device, self.device_id = device, device_id
        self.session = open_session(str(model_path), session_options(threads), model_path,
                                    self.providers())
        self.check_provider(self.session)
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

    @property
    def buffers(self) -> str:
        """What holds the device buffers: ``"torch"`` (CUDA tensors bound by pointer) or
        ``"ortvalue"`` (OrtValues refreshed with ``update_inplace``)."""
        return "ortvalue" if self._torch is None else "torch"

    def device_array(self, name: str) -> np.ndarray:
        """A host copy of the device buffer of live weight ``name`` (for checks)."""
        dev = self._device[name]
        return dev.cpu().numpy().copy() if self._torch is not None else dev.numpy().copy()

    def providers(self) -> list:
        """The execution providers of this store's sessions (the decoder's too)."""
        return ([("CUDAExecutionProvider", {"device_id": self.device_id})]
                if self.device == "cuda" else []) + ["CPUExecutionProvider"]

    def check_provider(self, session) -> None:
        """MissingPackageError where ``session`` fell back from CUDA to the CPU."""
        want = "CUDAExecutionProvider" if self.device == "cuda" else "CPUExecutionProvider"
        if session.get_providers()[0] != want:
            raise MissingPackageError("the CUDA execution provider failed to start (CUDA 13 / "
                                      "cuDNN 9 libraries missing?)")

    def bind_weights(self, b, names: dict[str, str]) -> None:
        """Bind the device buffer of every live weight to IOBinding ``b`` as input
        ``names[weight]``."""
        for n, dev in self._device.items():
            if self._torch is not None:
                b.bind_input(names[n], self.device, self.device_id, np.float32,
                             list(dev.shape), dev.data_ptr())
            else:
                b.bind_ortvalue_input(names[n], dev)

    def open_decoder(self, bundle_dir: Path, manifest: Manifest, threads: int | None):
        """The KV-cache decoder reading this store's device buffers
        (:mod:`.device_decoder`)."""
        from edgeadapt.runtime.backends.onnxruntime.device_decoder import OrtDeviceDecoder

        return OrtDeviceDecoder(bundle_dir, manifest, self, threads)

    def _binding(self):
        return thread_binding(self._local, self.session, {},
                              lambda b: self.bind_weights(b, self.graph_names))

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        b = self._binding()
        for name, x in self.prepare_inputs(inputs).items():
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


def open_cuda_standin(bundle_dir: Path, manifest: Manifest, use_torch: bool,
                      threads: int | None = 1) -> OrtDeviceStore:
    """The CUDA store's code on the CPU execution provider (``OrtDeviceStore(device="cpu")``),
    for checks where there is no GPU (tests/cuda_standin.py wraps it in a Runtime)."""
    model_path, live, names = bundle_parts(bundle_dir, manifest)
    return OrtDeviceStore(model_path, live, manifest.inputs, names, threads, device="cpu",
                          use_torch=use_torch)
