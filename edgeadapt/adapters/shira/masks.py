"""SHiRA mask selection: which K flat positions of an (out, in) weight are trained.

Every function returns a strictly increasing int64 tensor of flat row-major indices.

- ``random``: K positions uniformly without replacement (reproducible from a seeded generator).
- ``wm``:     the K largest ``|W|``.
- ``grad``:   the K largest ``|dL/dW|`` (gradient of a calibration loss).
- ``snip``:   the K largest ``|W * dL/dW|`` (SNIP saliency).
- ``struct``: every f-th row (or column) plus the main diagonal, f chosen so the count is as
  close to K as possible (ties -> the sparser pattern); the count may differ from K.

``exclude`` (flat indices, e.g. another adapter's positions) makes a mask avoid those positions:
scored kinds rank only the other entries (score = -inf at excluded ones), ``random`` draws from
the complement; ``struct`` is a fixed pattern and cannot avoid anything. Non-overlapping masks
let two adapters fuse without adding on the same weights.
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


def top_k_indices(score: torch.Tensor, k: int, exclude: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """Sorted flat indices of the K largest entries of ``score`` outside ``exclude``."""
    flat = score.detach().reshape(-1)
    if exclude is not None and exclude.numel():
        flat = flat.clone()  # leave the caller's score as it was
        flat[exclude] = -math.inf
    return torch.topk(flat, k, sorted=False).indices.sort().values


def random_indices(shape: tuple[int, int], k: int, seed: int,
                   exclude: torch.Tensor | None = None) -> torch.Tensor:
    """K distinct uniform positions (outside ``exclude``), drawn from a generator seeded with
    ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(shape[0] * shape[1], generator=gen)
    if exclude is not None and exclude.numel():
        allowed = torch.ones(shape[0] * shape[1], dtype=torch.bool)
        allowed[exclude] = False
        perm = perm[allowed[perm]]
    return perm[:k].sort().values


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
                seed: int = 0, axis: str = "row", exclude: torch.Tensor | None = None
                ) -> torch.Tensor:
    """Flat indices (sorted int64) of the mask of ``kind`` for ``weight`` (out, in), disjoint
    from ``exclude``.

    ``grad`` (same shape as weight) is required for ``grad`` and ``snip``.
    """
    shape = (weight.shape[0], weight.shape[1])
    if kind in ("grad", "snip") and grad is None:
        raise ConfigError(f"shira: mask {kind!r} needs a calibration loss (attach(..., calib=...))")
    if exclude is not None and exclude.numel():
        if kind == "struct":
            raise ConfigError("shira: a struct mask is a fixed pattern and cannot exclude "
                              "positions; use random, wm, grad or snip")
        if k > shape[0] * shape[1] - exclude.numel():
            raise ConfigError(f"shira: {k} positions do not fit outside the {exclude.numel()} "
                              f"excluded ones of a {shape[0]} x {shape[1]} weight")
    if kind == "random":
        return random_indices(shape, k, seed, exclude)
    if kind == "wm":
        return top_k_indices(weight.abs(), k, exclude)
    if kind == "grad":
        return top_k_indices(grad.abs(), k, exclude)
    if kind == "snip":
        return top_k_indices((weight * grad).abs(), k, exclude)
    if kind == "struct":
        return struct_indices(shape, k, axis)
    raise ConfigError(f"shira: unknown mask kind {kind!r}; choose one of {', '.join(MASK_KINDS)}")
