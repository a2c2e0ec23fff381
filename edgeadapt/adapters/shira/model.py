"""Choose SHiRA masks, swap target nn.Linear layers for SHiRA layers, extract and apply deltas."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from edgeadapt.adapters.base import adapted_layers, swap_linears
from edgeadapt.adapters.shira.config import ShiraConfig
from edgeadapt.adapters.shira.layer import ShiraLinear
from edgeadapt.adapters.shira.masks import mask_budget, select_mask
from edgeadapt.errors import AdapterFormatError, ConfigError
from edgeadapt.format.types import ShiraDelta


def calibration_grads(model: nn.Module, names: list[str],
                      calib: Callable[[], torch.Tensor]) -> dict[str, torch.Tensor]:
    """dL/dW of each target weight (module name -> (out, in)) for the loss ``calib()``.

    Only the target weights are differentiated (``torch.autograd.grad``): no ``.grad`` field of
    the model is touched, and each weight's ``requires_grad`` is restored afterwards.
    """
    weights = [model.get_submodule(n).weight for n in names]
    before = [w.requires_grad for w in weights]
    try:
        for w in weights:
            w.requires_grad_(True)
        with torch.enable_grad():
            loss = calib()
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ConfigError("shira: calib() must return a scalar loss tensor")
            grads = torch.autograd.grad(loss, weights, allow_unused=True)
    finally:
        for w, flag in zip(weights, before, strict=True):
            w.requires_grad_(flag)
    missing = [n for n, g in zip(names, grads, strict=True) if g is None]
    if missing:
        raise ConfigError(f"shira: the calibration loss does not depend on {missing[0]!r}")
    return {n: g.detach() for n, g in zip(names, grads, strict=True)}


def choose_masks(model: nn.Module, names: list[str], config: ShiraConfig,
                 calib: Callable[[], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Module name -> sorted flat indices of its mask (see :mod:`.masks`), avoiding
    ``config.exclude``."""
    exclude = excluded_indices(model, names, config)
    grads = {}
    if config.mask in ("grad", "snip"):
        if calib is None:
            raise ConfigError(f"shira: mask {config.mask!r} needs a calibration loss: "
                              "attach(model, config, calib=lambda: loss)")
        grads = calibration_grads(model, names, calib)
    masks = {}
    for i, name in enumerate(names):
        w = model.get_submodule(name).weight.detach()
        k = mask_budget((w.shape[0], w.shape[1]), config.density, config.budget_rank)
        masks[name] = select_mask(config.mask, w, k, grad=grads.get(name), seed=config.seed + i,
                                  axis=config.struct_axis, exclude=exclude.get(name)
                                  ).to(w.device)
    return masks


def excluded_indices(model: nn.Module, names: list[str], config: ShiraConfig
                     ) -> dict[str, torch.Tensor]:
    """Module name -> int64 positions of ``config.exclude`` for the target modules ``names``.

    ConfigError when ``exclude_run`` is set without the positions (the config never reads a
    run), when ``exclude`` names none of the targets (nothing would be excluded), or when a
    position is outside its weight.
    """
    if config.exclude is None:
        if config.exclude_run:
            raise ConfigError(
                f"shira: exclude_run {config.exclude_run!r} only records where excluded "
                "positions came from; read them into the config: ShiraConfig(exclude="
                "edgeadapt.train.excluded_positions(run_dir, model), exclude_run=run_dir)")
        return {}
    source = (f"exclude_run {config.exclude_run!r}" if config.exclude_run is not None
              else "exclude")
    if config.exclude and not set(config.exclude) & set(names):
        raise ConfigError(f"shira: {source} adapts none of this adapter's targets (it adapts "
                          f"{sorted(config.exclude)[:3]}, this one {sorted(names)[:3]}): "
                          "nothing would be excluded")
    found = {}
    for name in names:
        if name in config.exclude:
            idx = torch.tensor(config.exclude[name], dtype=torch.int64)
            size = model.get_submodule(name).weight.numel()
            if idx.numel() and int(idx[-1]) >= size:
                raise ConfigError(f"shira: {source}: positions of {name} must be inside "
                                  f"[0, {size})")
            found[name] = idx
    return found


def checked_indices(key: str, idx: torch.Tensor, linear: nn.Module) -> torch.Tensor:
    """SHiRA indices from a checkpoint as int64: an integer dtype (a float index would be
    silently floored), 1-D, non-empty, strictly increasing, inside the weight."""
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise AdapterFormatError(f"adapter state {key!r}: SHiRA indices must have an integer "
                                 f"dtype, got {str(idx.dtype).removeprefix('torch.')}")
    idx = idx.to(torch.int64)
    size = linear.weight.numel()
    if idx.dim() != 1 or idx.numel() == 0 or bool((idx[1:] <= idx[:-1]).any()) \
            or int(idx[0]) < 0 or int(idx[-1]) >= size:
        raise AdapterFormatError(f"adapter state {key!r}: SHiRA indices must be a non-empty, "
                                 f"strictly increasing 1-D list inside [0, {size})")
    return idx


def attach_shira(model: nn.Module, names: list[str], config: ShiraConfig,
                 calib: Callable[[], torch.Tensor] | None = None,
                 masks: dict[str, torch.Tensor] | None = None) -> None:
    """Replace each named nn.Linear with a :class:`ShiraLinear`; ``masks`` (e.g. from a
    checkpoint) skips mask selection."""
    if masks is None:
        masks = choose_masks(model, names, config, calib)
    swap_linears(model, names, lambda n, lin: ShiraLinear(lin, masks[n]))


def _trained(layer: ShiraLinear) -> tuple[np.ndarray, np.ndarray]:
    """The layer's int64 flat indices and its trained float32 values, as numpy copies."""
    return (layer.shira_indices.cpu().numpy().astype(np.int64),
            layer.shira_values.detach().float().cpu().numpy().copy())


def shira_delta(layer: ShiraLinear) -> ShiraDelta:
    """Numpy ``ShiraDelta``: int64 flat indices and float32 values; on a quantized base
    (``layer.quant``) the values' grid deltas ``(q' - q) s``
    (:func:`edgeadapt.format.quant_adapter.grid_delta`), exact there."""
    indices, values = _trained(layer)
    if layer.quant is not None:
        values = layer.quant.grid_delta(indices, values)[0]
    return ShiraDelta(indices=indices, values=values)


def saturated_on_grid(model: nn.Module) -> dict[str, int]:
    """Module name -> how many values of each SHiRA layer on a quantized base want a code
    outside the range (clipped to it: ``WeightQuant.on_grid``)."""
    return {name: int(layer.quant.grid_delta(*_trained(layer))[1].sum())
            for name, layer in adapted_layers(model)
            if isinstance(layer, ShiraLinear) and layer.quant is not None}


@torch.no_grad()
def fuse_shira(weight: torch.Tensor, delta: ShiraDelta, scale: float) -> None:
    """``W.flat[indices] += scale * values`` in place."""
    idx = torch.from_numpy(np.asarray(delta.indices, dtype=np.int64)).to(weight.device)
    vals = torch.from_numpy(np.asarray(delta.values, dtype=np.float32)).to(weight.device)
    flat = weight.view(-1)
    flat[idx] += (scale * vals).to(weight.dtype)
