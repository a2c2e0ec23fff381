"""Framework-neutral (numpy) adapter payloads: what training extracts, files store, runtimes apply.

Every target is keyed by the PyTorch name of the *base weight* it modifies, e.g.
``"model.layers.0.self_attn.q_proj.weight"``; weights are in PyTorch layout ``(out, in)``.
Scales are folded in where the method allows it, so applying an adapter at strength ``s`` is:

- SHiRA:  ``W.flat[indices] = W0.flat[indices] + s * values``   (fused, sparse)
- LoRA:   ``W = W0 + s * B @ A``                                 (B already carries alpha / r)
- SiRA:   ``y = W0 x + s * sum_{e in topk(x)} p_e(x) * B_e A_e x`` (unfused, per token)

Pruned SoRA is stored and applied as LoRA (gate and alpha / r_max folded into B).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

METHODS = ("shira", "lora", "sora", "sira")


@dataclass(frozen=True)
class ShiraDelta:
    """Sparse values of one weight.

    indices: (K,) int64, strictly increasing flat row-major positions into the (out, in) weight.
    values:  (K,) float (fp32/fp16/bf16 as stored); the trained values minus nothing: they are
             *deltas*, ``W[idx] = W0[idx] + scale * values``.
    """

    indices: np.ndarray
    values: np.ndarray


@dataclass(frozen=True)
class LoraDelta:
    """Low-rank delta of one weight: ``delta W = B @ A``.

    A: (r, in) float32.   B: (out, r) float32, with alpha / r (and SoRA's gate) folded in.
    """

    A: np.ndarray
    B: np.ndarray

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


@dataclass(frozen=True)
class SiraBranch:
    """A sparse mixture of E LoRA experts on one weight (runs unfused).

    router: (E, in) float32 gate weights (no bias); logits = x @ router.T.
    A: (E, r, in) float32.   B: (E, out, r) float32 with alpha / r folded in.
    top_k: experts per token; capacity_factor: C = ceil(capacity_factor * top_k * tokens / E).
    """

    router: np.ndarray
    A: np.ndarray
    B: np.ndarray
    top_k: int
    capacity_factor: float

    @property
    def num_experts(self) -> int:
        return int(self.router.shape[0])


Delta = ShiraDelta | LoraDelta | SiraBranch


@dataclass
class Adapter:
    """One trained adapter, independent of torch and of any backend.

    method: one of METHODS ("sora" adapters hold LoraDelta targets after pruning).
    targets: base weight name -> delta.
    shapes: base weight name -> (out, in) of the base weight.
    weight_sha256: base weight name -> sha256 hex of the *base* weight's fp32 bytes (torch
        layout, C order): ties the adapter to the exact base it was trained on.
    scale: default strength applied at inference (1.0 = as trained).
    meta: free-form JSON-able information (task, metrics, ranks kept, ...).
    head: a classifier's task head, weight name -> trained (out, in) float32 values, e.g.
        ``{"classifier.weight": (labels, hidden)}``. Unlike the deltas above a head *replaces*
        the bundle's head weight (heads are new per task, not a change of a pretrained one) and
        is never scaled; when adapters are fused, the first one that carries a head supplies it.
        Heads train without bias (the bias stays at its zero init), so a head is one matrix.
    """

    method: str
    targets: dict[str, Delta]
    shapes: dict[str, tuple[int, int]]
    weight_sha256: dict[str, str]
    scale: float = 1.0
    meta: dict = field(default_factory=dict)
    head: dict[str, np.ndarray] = field(default_factory=dict)
