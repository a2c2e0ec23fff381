"""How much storing an adapter's values in a narrower dtype changed it: the relative change of
each target's delta between the adapter as given and as read back (torch-free).

The measure is the Frobenius norm ``||D' - D|| / ||D||`` of the dense delta ``D`` (SHiRA: the
values; LoRA / SoRA: ``B A``, computed from r x r Gram matrices without forming ``D``; SiRA: its
router, A and B together). Round to nearest in fp16 moves a value in fp16's normal range
(|v| >= 6.1e-5) by at most 2^-11 of itself, 2-3e-4 relative in this norm; bf16 keeps 8 bits,
about 2e-3. ``ROUNDING_WARN`` sits between, so fp16 warns only for values near or below its
subnormal range (and bf16 warns: it costs that much). Measured: docs/format.md §2, "Value
precision".
"""

from __future__ import annotations

import numpy as np

from edgeadapt.format.types import Adapter, LoraDelta, ShiraDelta, SiraBranch

#: a target's delta changed by more than this (relative) when stored: worth a warning
ROUNDING_WARN = 1e-3


def delta_change(given: Adapter, stored: Adapter) -> dict[str, float]:
    """Target name -> ``||D_stored - D_given|| / ||D_given||`` (0 where ``D_given`` is 0), for
    the targets both adapters have with the same kind of delta."""
    out: dict[str, float] = {}
    for name, a in given.targets.items():
        b = stored.targets.get(name)
        if isinstance(a, LoraDelta) and isinstance(b, LoraDelta):
            diff = _lora_norm2([b.B, -a.B.astype(np.float64)], [b.A, a.A])
            ref = _lora_norm2([a.B], [a.A])
        elif isinstance(a, ShiraDelta) and isinstance(b, ShiraDelta):
            diff = _norm2(b.values, a.values)
            ref = _norm2(a.values)
        elif isinstance(a, SiraBranch) and isinstance(b, SiraBranch):
            pairs = [(b.router, a.router), (b.A, a.A), (b.B, a.B)]
            diff = sum(_norm2(x, y) for x, y in pairs)
            ref = sum(_norm2(y) for _, y in pairs)
        else:
            continue
        out[name] = float(np.sqrt(max(diff, 0.0) / ref)) if ref > 0 else 0.0
    return out


def _norm2(x: np.ndarray, y: np.ndarray | None = None) -> float:
    """``||x - y||^2`` (``||x||^2`` without y), in float64."""
    d = np.asarray(x, np.float64) - (0.0 if y is None else np.asarray(y, np.float64))
    return float(np.sum(d * d))


def _lora_norm2(bs: list[np.ndarray], as_: list[np.ndarray]) -> float:
    """``||sum_k B_k A_k||_F^2 = trace((U^T U)(V V^T))`` with ``U = [B_1 ...]`` (out, R) and
    ``V = [A_1; ...]`` (R, in), in float64."""
    U = np.concatenate([np.asarray(b, np.float64) for b in bs], axis=1)
    V = np.concatenate([np.asarray(a, np.float64) for a in as_], axis=0)
    return float(np.sum((U.T @ U) * (V @ V.T)))
