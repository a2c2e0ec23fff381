"""How far one output is from another: the one relative error every parity check uses.

``rel_error(got, want) = max |got - want| / max |want|`` in float64, a max-norm ratio: it reads
as "the worst element is off by this share of the largest reference value", which is what the
tolerances of the exporters (1e-4), the benchmark and the runtime checks (1e-3) are stated in.
Torch-free (numpy only).
"""

from __future__ import annotations

import numpy as np

#: the denominator's floor, so that an all-zero reference gives a finite (huge) error
TINY = 1e-30


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    """``max |got - want| / max(max |want|, 1e-30)``, computed in float64.

    got, want: arrays of the same shape (any dtype numpy can cast to float64). Returns ``inf``
    when the shapes differ (no broadcasting) or ``got`` holds a NaN or an infinity, so that a
    check ``rel_error(...) <= tol`` fails on them rather than passing on a NaN comparison.
    """
    g = np.asarray(got, dtype=np.float64)
    w = np.asarray(want, dtype=np.float64)
    if g.shape != w.shape or not np.all(np.isfinite(g)):
        return float("inf")
    if g.size == 0:
        return 0.0
    return float(np.max(np.abs(g - w)) / max(float(np.max(np.abs(w))), TINY))
