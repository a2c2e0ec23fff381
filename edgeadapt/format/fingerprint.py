"""Base-model fingerprints: sha256 of a weight's fp32 bytes, and of a set of weights."""

from __future__ import annotations

import hashlib

import numpy as np


def weight_sha256(weight: np.ndarray) -> str:
    """sha256 hex of ``weight`` as C-contiguous float32 in PyTorch layout (out, in)."""
    arr = np.ascontiguousarray(weight, dtype=np.float32)
    return hashlib.sha256(arr.tobytes()).hexdigest()


def fingerprint(weight_hashes: dict[str, str]) -> str:
    """One hash for a set of weights: sha256 over sorted ``name=hash`` lines."""
    lines = "\n".join(f"{name}={h}" for name, h in sorted(weight_hashes.items()))
    return hashlib.sha256(lines.encode()).hexdigest()
