"""The CUDA store's code on the CPU execution provider, as a Runtime: how the device store's
binding and commit logic is checked on machines without a GPU (the runtime tests, and
``scripts/cuda_check.py check --standin``, which imports this module as ``tests.cuda_standin``
with the repository root on ``PYTHONPATH``). Not a deployment mode."""

from __future__ import annotations

from pathlib import Path

from edgeadapt.format.manifest import read_manifest
from edgeadapt.runtime import Runtime, get_backend
from edgeadapt.runtime.backends.onnxruntime.cuda import open_cuda_standin


def load_cuda_standin(bundle_dir: str | Path, torch_buffers: bool = True,
                      threads: int | None = 1) -> Runtime:
    """A Runtime on ``OrtDeviceStore(device="cpu")``: its "device" buffers are separate host
    copies bound by pointer (torch tensors if ``torch_buffers``, else OrtValues refreshed with
    ``update_inplace``), so the outputs follow a switch only if ``commit`` moved it into them."""
    bundle = Path(bundle_dir)
    manifest = read_manifest(bundle)
    store = open_cuda_standin(bundle, manifest, use_torch=torch_buffers, threads=threads)
    return Runtime(bundle, manifest, store, get_backend("onnxruntime"), "cpu", "live",
                   "CUDA store on the CPU execution provider (stand-in)")


def load_device_runtime(bundle_dir: str | Path, where: str) -> Runtime:
    """The device store's Runtime for a test parametrised by ``where``: "cuda" (skipped without a
    CUDA device and onnxruntime-gpu), "standin-torch" or "standin-ortvalue"
    (:func:`load_cuda_standin` with torch tensors or OrtValues as the "device" buffers)."""
    if where == "cuda":
        import pytest
        import torch

        ort = pytest.importorskip("onnxruntime")
        if "CUDAExecutionProvider" not in ort.get_available_providers() or \
                not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        from edgeadapt.runtime import load

        return load(bundle_dir, device="cuda")
    return load_cuda_standin(bundle_dir, torch_buffers=where == "standin-torch")
