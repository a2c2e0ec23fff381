"""SHiRA mask selection: which K flat positions of an (out, in) weight are trained.

Every function returns a strictly increasing int64 tensor of flat row-major indices.

- ``random``: K positions uniformly without replacement (reproducible from a seeded generator).
- ``wm``:     the K largest ``|W|``.
- ``grad``:   the K largest ``|dL/dW|`` (gradient of a calibration loss).
- ``snip``:   the K largest ``|W * dL/dW|`` (SNIP saliency).
- ``struct``: every f-th row (or column) plus the main diagonal, f chosen so the count is as
  close to K as possible (ties -> the sparser pattern); the count may differ from K.
"""

from __future__ import annotations

import math

import torch

from edgeadapt.errors import ConfigError

MASK_KINDS = ("random", "wm", "grad", "snip", "struct")
STRUCT_AXES = ("row", "col")


def mask_budget(shape: tuple[int, int], density: float, budget_rank: int | None) -> int:
    """K for one (out, in) matrix: ``budget_rank * (out + in)`` if given, else
    ``round(density * out * in)``; clamped to [1, out * in]."""
    out_f, in_f = shape
    k = budget_rank * (out_f + in_f) if budget_rank is not None else round(density * out_f * in_f)
    return int(min(max(k, 1), out_f * in_f))


def top_k_indices(score: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted flat indices of the K largest entries of ``score``."""
    return torch.topk(score.detach().reshape(-1), k, sorted=False).indices.sort().values


def random_indices(shape: tuple[int, int], k: int, seed: int) -> torch.Tensor:
    """K distinct uniform positions, drawn from a generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(shape[0] * shape[1], generator=gen)[:k].sort().values


def _struct_count(out_f: int, in_f: int, f: int, axis: str) -> int:
    lines, length = (out_f, in_f) if axis == "row" else (in_f, out_f)
    diag = min(out_f, in_f)
    # chosen lines 0, f, 2f, ... ; the diagonal entries on them are already counted
    return math.ceil(lines / f) * length + diag - math.ceil(diag / f)


def struct_indices(shape: tuple[int, int], k: int, axis: str = "row") -> torch.Tensor:
    """Every f-th row (axis 'row') or column (axis 'col') plus the diagonal, f in [1, lines]
    minimising ``|count - k|``."""
    out_f, in_f = shape
    lines = out_f if axis == "row" else in_f
    f = min(range(1, lines + 1),
            key=lambda f: (abs(_struct_count(out_f, in_f, f, axis) - k), -f))
    mask = torch.zeros(out_f, in_f, dtype=torch.bool)
    if axis == "row":
        mask[::f, :] = True
    else:
        mask[:, ::f] = True
    diag = torch.arange(min(out_f, in_f))
    mask[diag, diag] = True
    return mask.reshape(-1).nonzero().reshape(-1)


def select_mask(kind: str, weight: torch.Tensor, k: int, *, grad: torch.Tensor | None = None,
                seed: int = 0, axis: str = "row") -> torch.Tensor:
    """Flat indices (sorted int64) of the mask of ``kind`` for ``weight`` (out, in).

    ``grad`` (same shape as weight) is required for ``grad`` and ``snip``.
    """
    shape = (weight.shape[0], weight.shape[1])
    if kind in ("grad", "snip") and grad is None:
        raise ConfigError(f"shira: mask {kind!r} needs a calibration loss (attach(..., calib=...))")
    if kind == "random":
        return random_indices(shape, k, seed)
    if kind == "wm":
        return top_k_indices(weight.abs(), k)
    if kind == "grad":
        return top_k_indices(grad.abs(), k)
    if kind == "snip":
        return top_k_indices((weight * grad).abs(), k)
    if kind == "struct":
        return struct_indices(shape, k, axis)
    raise ConfigError(f"shira: unknown mask kind {kind!r}; choose one of {', '.join(MASK_KINDS)}")
