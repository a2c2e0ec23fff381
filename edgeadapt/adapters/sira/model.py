"""Swap target nn.Linear layers for SiRA layers; extract branches; re-insert them from numpy."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgeadapt.adapters.base import adapted_layers, swap_linears
from edgeadapt.adapters.sira.config import SiraConfig
from edgeadapt.adapters.sira.layer import SiraLinear
from edgeadapt.format.types import SiraBranch


def attach_sira(model: nn.Module, names: list[str], config: SiraConfig) -> None:
    """Replace each named nn.Linear with a :class:`SiraLinear` (in place)."""
    swap_linears(model, names, lambda _n, lin: SiraLinear(
        lin, config.num_experts, config.r, config.alpha, config.top_k, config.capacity_factor,
        config.expert_dropout, config.aux_loss_weight))


def sira_aux_loss(model: nn.Module) -> torch.Tensor:
    """``sum over SiRA layers of aux_loss_weight * aux_loss`` from the last training forward
    (a zero scalar if there is none, e.g. in eval mode). Add it to the task loss."""
    terms = [layer.aux_loss_weight * layer.aux_loss for _, layer in adapted_layers(model)
             if isinstance(layer, SiraLinear) and layer.aux_loss is not None]
    return sum(terms) if terms else torch.zeros(())


def sira_branch(layer: SiraLinear) -> SiraBranch:
    """Numpy ``SiraBranch`` with alpha / r folded into B."""
    def arr(t: torch.Tensor) -> np.ndarray:
        return t.detach().float().cpu().numpy().copy()
    return SiraBranch(router=arr(layer.sira_router), A=arr(layer.sira_A),
                      B=arr(layer.sira_B * layer.scaling), top_k=layer.top_k,
                      capacity_factor=float(layer.capacity_factor))


def insert_sira(linear: nn.Linear, branch: SiraBranch, scale: float = 1.0) -> SiraLinear:
    """A :class:`SiraLinear` (eval mode) around ``linear`` holding ``branch``'s weights, its B
    multiplied by ``scale``."""
    E, r = branch.A.shape[0], branch.A.shape[1]
    with torch.random.fork_rng(devices=[]):   # the init is overwritten: leave the RNG alone
        layer = SiraLinear(linear, E, r, alpha=float(r), top_k=branch.top_k,
                           capacity_factor=branch.capacity_factor)   # alpha / r = 1: B is folded
    dev, dt = linear.weight.device, linear.weight.dtype
    with torch.no_grad():
        layer.sira_router.copy_(torch.as_tensor(branch.router, dtype=dt, device=dev))
        layer.sira_A.copy_(torch.as_tensor(branch.A, dtype=dt, device=dev))
        layer.sira_B.copy_(torch.as_tensor(branch.B, dtype=dt, device=dev) * scale)
    for p in (layer.sira_router, layer.sira_A, layer.sira_B):
        p.requires_grad_(False)
    return layer.eval()
