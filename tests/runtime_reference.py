"""What every runtime switch test compares against: the PyTorch model carrying the same adapters
(read back from the bundle's files), and the relative error between two outputs."""

from __future__ import annotations

import copy

import numpy as np
import torch

from edgeadapt.adapters import apply_adapter_torch
from edgeadapt.format import read_adapter, read_manifest
from edgeadapt.models import example_inputs, forward


def torch_reference(lm, bundle, active, inputs) -> np.ndarray:
    """Logits of a copy of ``lm`` with ``active`` = [(adapter name, scale)] applied from the
    bundle's adapter files by ``apply_adapter_torch``."""
    ref = copy.deepcopy(lm)
    manifest = read_manifest(bundle)
    for name, scale in active:
        apply_adapter_torch(ref.model, read_adapter(bundle / manifest.adapters[name].file),
                            scale)
    with torch.no_grad():
        return forward(ref, inputs).numpy()


def parity(got, want) -> float:
    """max |got - want| / max |want|."""
    return float(np.abs(got - want).max() / np.abs(want).max())


def example_pair(lm):
    """Example inputs (batch 2, seq 7, seed 3) as torch tensors and as numpy arrays."""
    t = example_inputs(lm, batch=2, seq=7, seed=3)
    return t, {k: v.numpy() for k, v in t.items()}
