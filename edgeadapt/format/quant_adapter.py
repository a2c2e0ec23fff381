"""SHiRA adapters on a quantized base (torch-free): values rounded onto the base's grid.

A SHiRA value ``v`` at an entry with base code ``q`` and scale ``s`` (:mod:`.quant`) lands, in
a switch on codes, on ``q' = clip(rint((q s + v) / s), qmin, qmax)`` (``Grid.requantize``). The
*grid delta* of ``v`` is what it really adds to the dequantized weight:

    d = (q' - q) * s            (float32)

An adapter whose values are grid deltas is exact on that base: requantizing ``d`` gives back
``q'`` (``rint`` of ``q' + O(ulp)``) and never saturates, so the switch loses nothing. (Stored as
float16, the ``.eadp`` default, ``d`` moves by at most ``|q' - q| 2^-11`` codes, 1/8 of a code
for int8's widest step of 255: still ``q'``, barring values in float16's subnormal range.)
Quantization-aware SHiRA trains values whose grid deltas are what it exports
(``edgeadapt.models.quantized.WeightQuant.on_grid``); :func:`round_to_grid` is the post-training
rounding of an adapter trained on the fp32 base, for comparison.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from edgeadapt.errors import ConfigError, TargetMismatchError
from edgeadapt.format.quant import Grid, codes_weight, live_grid
from edgeadapt.format.types import Adapter, ShiraDelta

#: ``Adapter.meta`` key recording the grid an adapter's values lie on
META_KEY = "quant"


def grid_delta(g: Grid, codes: np.ndarray, scales: np.ndarray, indices: np.ndarray,
               values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(d, saturated)`` for ``values`` (K,) at flat ``indices`` (K,) of a weight with base
    ``codes (out, in)`` and ``scales (out, in // G)``: the grid deltas ``(q' - q) s`` float32
    (K,) and the boolean mask (K,) of the entries that saturated (module docstring)."""
    idx = np.asarray(indices, np.int64)
    q = np.asarray(codes).reshape(-1)[idx]
    s = g.scale_at(scales, tuple(np.asarray(codes).shape), idx)
    new, saturated = g.requantize(q, s, values)
    d = (new.astype(np.float32) - q.astype(np.float32)) * s
    return d.astype(np.float32), saturated


def round_to_grid(adapter: Adapter, base_weights: Mapping[str, np.ndarray], precision: str
                  ) -> tuple[Adapter, dict[str, int]]:
    """A SHiRA ``adapter`` trained on the fp32 base, rounded onto the grid a ``precision``
    bundle holds its targets on (:func:`~edgeadapt.format.quant.live_grid`; post-training
    rounding): every value replaced by its grid delta, ``meta`` records ``{"quant": that
    grid's name}``, as an adapter trained quantization-aware on it does. base_weights:
    target name -> fp32 ``(out, in)`` base weight. Returns the new adapter (the input is not
    changed) and the saturated entries per target. ConfigError for a non-SHiRA adapter,
    TargetMismatchError for a missing weight."""
    g = live_grid(precision)
    if adapter.method != "shira":
        raise ConfigError(f"only SHiRA values round onto a grid; this adapter is "
                          f"{adapter.method!r} (LoRA / SoRA run unfused on a quantized base)")
    targets, saturated = {}, {}
    for name, delta in adapter.targets.items():
        if name not in base_weights:
            raise TargetMismatchError(f"round_to_grid: no base weight given for {name!r}")
        if not isinstance(delta, ShiraDelta):
            raise ConfigError(f"round_to_grid: {name!r} is not a SHiRA delta")
        codes, scales = g.quantize(codes_weight(base_weights[name], g))
        d, sat = grid_delta(g, codes, scales, delta.indices, delta.values)
        targets[name] = ShiraDelta(indices=np.asarray(delta.indices, np.int64), values=d)
        saturated[name] = int(sat.sum())
    rounded = dataclasses.replace(adapter, targets=targets,
                                  meta={**adapter.meta, META_KEY: g.name})
    return rounded, saturated
