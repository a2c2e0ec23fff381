"""Pure SoRA gate arithmetic, for numpy arrays and torch tensors alike (no torch import)."""

from __future__ import annotations

from typing import Any


def soft_threshold(g: Any, xi: float) -> Any:
    """The proximal operator of ``xi * |g|_1``: ``sign(g) * max(|g| - xi, 0)`` (new array)."""
    sign = (g > 0) * 1.0 - (g < 0) * 1.0
    return sign * (abs(g) - xi).clip(min=0)


def prune_sora(A: Any, B: Any, g: Any, scale: float) -> tuple[Any, Any]:
    """Remove the dead ranks of a gated LoRA and fold gate and scale into B.

    A: (r_max, in), B: (out, r_max), g: (r_max,), scale = alpha / r_max.
    keep = g != 0;  A' = A[keep] (r, in);  B' = B[:, keep] * g[keep] * scale (out, r),
    so ``B' A' = B diag(g) A * scale``: the same delta with exactly the zero-gate ranks gone.
    """
    keep = g != 0
    return A[keep], B[:, keep] * g[keep] * scale
