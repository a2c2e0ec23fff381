"""How a backend holds a linear weight: the one home of the layout arithmetic (numpy only).

A PyTorch weight ``W`` has shape ``(out, in)`` (C order; torch flat index ``i = r * in + c``).
A backend tensor ``X`` holds it in one of three layouts:

- ``"as-is"``: ``X`` is ``(out, in)``, ``X = W``; flat index ``i`` -> ``i``.
- ``"transposed"``: ``X`` is ``(in, out)``, ``X = W.T`` (what ``MatMul(x, X)`` reads);
  ``i`` -> ``c * out + r``.
- ``"blocked32"``: ``X`` is ``(out / 32, in, 32)``, ``X[b, c, j] = W[32 b + j, c]``: W.T cut
  into column blocks of 32 output features, each block contiguous. ``MatMul(x, X)`` on
  ``x (1, M, in)`` gives ``(out / 32, M, 32)``, transposed and reshaped to ``(M, out)``
  (edgeadapt.export.onnx_graph). With ``r = 32 b + j``: ``i`` -> ``b * in * 32 + c * 32 + j``.
  Why: ONNX Runtime's MLAS prepacks constant weights, and a weight fed as a graph input is
  read unpacked; for one token (M = 1) its GEMV walks ``(in, out)`` in 128-byte strips
  ``out * 4`` bytes apart, which the hardware prefetcher follows badly (1.6x the packed time on
  out-of-cache weights), while a 32-wide block is one contiguous ``in x 128``-byte run
  (0.85x; ``experiments/ort_forward_probe.py matmul``, docs/bench.md). It is also a packed-B
  layout that a GEMM can read in place: edgeadapt's ONNX Runtime kernel
  (``runtime/kernels/blocked_matmul.cpp``) does, where MatMul copies it on every call.
"""

from __future__ import annotations

import numpy as np

from edgeadapt.errors import ConfigError

AS_IS = "as-is"
TRANSPOSED = "transposed"
BLOCKED = "blocked32"
BLOCK = 32
LAYOUTS = (AS_IS, TRANSPOSED, BLOCKED)


def _check(shape: tuple[int, int], layout: str) -> tuple[int, int]:
    out, inp = (int(shape[0]), int(shape[1]))
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown weight layout {layout!r}: use one of {LAYOUTS}")
    if layout == BLOCKED and out % BLOCK:
        raise ConfigError(f"layout {BLOCKED} needs out % {BLOCK} == 0; weight is {shape}")
    return out, inp


def backend_shape(shape: tuple[int, int], layout: str) -> tuple[int, ...]:
    """Shape of the backend tensor holding an ``(out, in)`` weight."""
    out, inp = _check(shape, layout)
    if layout == AS_IS:
        return (out, inp)
    if layout == TRANSPOSED:
        return (inp, out)
    return (out // BLOCK, inp, BLOCK)


def backend_view(weight: np.ndarray, layout: str) -> np.ndarray:
    """``weight (out, in)`` seen in the backend layout: a view (strided), no copy."""
    out, inp = _check(weight.shape, layout)
    if layout == AS_IS:
        return weight
    if layout == TRANSPOSED:
        return weight.T
    return weight.reshape(out // BLOCK, BLOCK, inp).transpose(0, 2, 1)


def to_backend(weight: np.ndarray, layout: str) -> np.ndarray:
    """The C-contiguous backend tensor for ``weight (out, in)``."""
    return np.ascontiguousarray(backend_view(np.asarray(weight), layout))


def to_torch(array: np.ndarray, shape: tuple[int, int], layout: str) -> np.ndarray:
    """The ``(out, in)`` weight held by backend ``array``: a view for as-is / transposed, a
    copy for blocked32."""
    out, inp = _check(shape, layout)
    if tuple(array.shape) != backend_shape(shape, layout):
        raise ConfigError(f"backend array {array.shape} is not {layout} of {shape}")
    if layout == AS_IS:
        return array
    if layout == TRANSPOSED:
        return array.T
    return array.transpose(0, 2, 1).reshape(out, inp)


def backend_index(indices: np.ndarray, shape: tuple[int, int], layout: str) -> np.ndarray:
    """Torch flat indices ``i = r * in + c`` of an ``(out, in)`` weight -> backend flat indices
    (int64; the module docstring gives each map)."""
    out, inp = _check(shape, layout)
    idx = np.asarray(indices, dtype=np.int64)
    if layout == AS_IS:
        return idx
    r, c = idx // inp, idx % inp
    if layout == TRANSPOSED:
        return c * out + r
    return (r // BLOCK) * (inp * BLOCK) + c * BLOCK + r % BLOCK


def torch_index(indices: np.ndarray, shape: tuple[int, int], layout: str) -> np.ndarray:
    """Backend flat indices -> torch flat indices ``r * in + c`` (the inverse of
    :func:`backend_index`)."""
    out, inp = _check(shape, layout)
    idx = np.asarray(indices, dtype=np.int64)
    if layout == AS_IS:
        return idx
    if layout == TRANSPOSED:
        c, r = idx // out, idx % out
    else:
        b, rest = idx // (inp * BLOCK), idx % (inp * BLOCK)
        c, r = rest // BLOCK, b * BLOCK + rest % BLOCK
    return r * inp + c


def transposed_from_blocked(array: np.ndarray) -> np.ndarray:
    """The ``transposed`` (in, out) tensor of the weight a ``blocked32`` array ``(out/32, in,
    32)`` holds, in one copy: ``X_T[c, 32 b + j] = Xb[b, c, j]``."""
    if array.ndim != 3 or array.shape[2] != BLOCK:
        raise ConfigError(f"not a {BLOCKED} array: shape {array.shape}")
    nb, inp, blk = array.shape
    return np.ascontiguousarray(array.transpose(1, 0, 2)).reshape(inp, nb * blk)
