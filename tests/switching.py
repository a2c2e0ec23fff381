"""The concurrency harness every switch test shares (numpy only, no torch)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def runs_while_switching(run: Callable[[], np.ndarray], switch: Callable[[Any], None],
                         states: Sequence[Any], readers: int, switches: int, seed: int
                         ) -> tuple[list[Exception], list[np.ndarray]]:
    """``readers`` threads call ``run()`` in a loop while this thread makes ``switches`` switches
    to states drawn uniformly (``np.random.default_rng(seed)``) from ``states``; returns the
    readers' exceptions and every output they saw."""
    errors: list[Exception] = []
    outputs: list[np.ndarray] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                outputs.append(run())
        except Exception as exc:  # pragma: no cover - reported by the caller's assert
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(readers)]
    for t in threads:
        t.start()
    rng = np.random.default_rng(seed)
    try:
        for _ in range(switches):
            switch(states[int(rng.integers(len(states)))])
    finally:
        stop.set()
        for t in threads:
            t.join()
    return errors, outputs


def load_device_standin(bundle, torch_buffers: bool):
    """A Runtime on ``OrtDeviceStore(device="cpu")``: the CUDA store's binding and commit code on
    the CPU execution provider, its "device" buffers separate host copies (torch tensors bound
    by pointer if ``torch_buffers``, else OrtValues refreshed with ``update_inplace``)."""
    import os
    from pathlib import Path
    from unittest import mock

    from edgeadapt.format import read_manifest
    from edgeadapt.runtime.api import Runtime
    from edgeadapt.runtime.onnxruntime_backend import OrtDeviceStore, read_live_weights

    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    live = read_live_weights(bundle, manifest)
    names = {n: manifest.weights[n].onnx["name"] for n in live}
    env = {} if torch_buffers else {"EDGEADAPT_NO_TORCH": "1"}
    with mock.patch.dict(os.environ, env):
        store = OrtDeviceStore(bundle / manifest.onnx["file"], live, manifest.inputs, names,
                               threads=1, device="cpu")
    assert (store._torch is not None) == torch_buffers
    return Runtime(bundle, manifest, store, "onnxruntime", "cpu", "live", "device stand-in")


def device_hashes(rt) -> dict[str, str]:
    """sha256 of every device buffer of a Runtime on ``OrtDeviceStore``."""
    import hashlib

    return {n: hashlib.sha256(rt.store.device_array(n).tobytes()).hexdigest()
            for n in rt.store.live_weights()}
