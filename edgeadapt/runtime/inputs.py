"""What a caller hands the runtime, checked before any backend sees it (numpy only, torch-free):
a switch's names and scales (:func:`switch_names`, :func:`switch_scales`) and a run's model
inputs against ``bundle.json``'s ``inputs`` (:func:`check_inputs`): what a backend would
otherwise do with a bad input is silent (ONNX Runtime truncates float ids and wraps negative
ones) or an untyped error from deep inside it.

Each spec is ``{"name", "dtype", "shape", "range"?}``: ``shape`` lists ints (fixed) and strings
(symbolic: any size >= 1, the same size wherever the same symbol appears, so ``input_ids`` and
``attention_mask`` must agree on ``batch`` and ``seq``); ``range`` ``[low, high)`` bounds the
values (token ids: ``[0, vocab_size)``; written by ``edgeadapt export`` since 2026-11-30, older
bundles are checked without it).
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from edgeadapt.errors import ConfigError


def check_inputs(specs: list[dict], inputs: dict[str, object]) -> dict[str, np.ndarray]:
    """``inputs`` as C-contiguous arrays of their specs' dtypes; ConfigError naming the input
    for an unknown or missing name, a dtype that does not convert losslessly in kind (floats for
    integer ids), a wrong rank, an empty or mismatched dimension, or a value out of ``range``.
    No specs (bundles without ``inputs``): the inputs as arrays, unchecked."""
    if not specs:
        return {k: np.ascontiguousarray(v) for k, v in inputs.items()}
    by_name = {s["name"]: s for s in specs}
    unknown, missing = sorted(set(inputs) - set(by_name)), sorted(set(by_name) - set(inputs))
    if unknown or missing:
        raise ConfigError(f"run: inputs must be {sorted(by_name)}; unknown {unknown}, "
                          f"missing {missing}")
    sizes: dict[str, tuple[int, str]] = {}  # symbol -> (size, the input that fixed it)
    out = {}
    for name, spec in by_name.items():
        x = np.asarray(inputs[name])
        dtype = np.dtype(spec.get("dtype", x.dtype))
        if not np.can_cast(x.dtype, dtype, casting="same_kind") or (
                x.dtype == np.bool_ and dtype != np.bool_):
            raise ConfigError(f"run: {name} has dtype {x.dtype}; the model takes {dtype}")
        shape = spec.get("shape") or []
        if x.ndim != len(shape):
            raise ConfigError(f"run: {name} has shape {x.shape}; the model takes {len(shape)}-D "
                              f"{tuple(shape)}")
        for dim, n in zip(shape, x.shape, strict=True):
            if isinstance(dim, int):
                if n != dim:
                    raise ConfigError(f"run: {name} has shape {x.shape}; the model takes "
                                      f"{tuple(shape)}")
                continue
            seen = sizes.setdefault(dim, (n, name))
            if n < 1 or seen[0] != n:
                raise ConfigError(f"run: {name} has {dim}={n}, but "
                                  + ("it must be at least 1" if n < 1 else
                                     f"{seen[1]} has {dim}={seen[0]}"))
        bounds = spec.get("range")
        if bounds is not None and x.size:
            lo, hi = x.min(), x.max()
            if lo < bounds[0] or hi >= bounds[1]:
                raise ConfigError(f"run: {name} holds values in [{lo}, {hi}], outside "
                                  f"[{bounds[0]}, {bounds[1]})")
        out[name] = np.ascontiguousarray(x, dtype=dtype)
    return out


def switch_names(names: object) -> list[str]:
    """``switch``'s names as a list: None -> [], one str -> [it]; ConfigError for anything but
    str names, or a name given twice."""
    if names is None:
        return []
    if isinstance(names, str):
        return [names]
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"switch: names must be None, an adapter name or a list of names; "
                          f"got {names!r}")
    if len(set(names)) != len(names):
        raise ConfigError(f"switch: adapter names repeat: {list(names)}; use scales instead")
    return list(names)


def _scale(value: object) -> float:
    """One scale as a finite float: a Python or numpy real number or a 0-d array (no bools,
    no strings); ConfigError otherwise."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ConfigError(f"switch: scale {value!r} is not a real number")
    s = float(value)
    if not math.isfinite(s):
        raise ConfigError(f"switch: scale {s} is not finite")
    return s


def switch_scales(scales: object, n: int) -> list[float | None]:
    """``switch``'s scales, one per name (None: each adapter's own); ConfigError on a count
    mismatch or a value that is not a finite real number."""
    if scales is None:
        return [None] * n
    if isinstance(scales, (list, tuple)) or (isinstance(scales, np.ndarray) and scales.ndim == 1):
        out: list[float | None] = [_scale(s) for s in scales]
        if len(out) != n:
            raise ConfigError(f"switch: {n} names but {len(out)} scales")
        return out
    if n != 1:
        raise ConfigError("switch: give one scale per adapter name")
    return [_scale(scales)]
