"""Swap target nn.Linear layers for SoRA layers; gate optimisation helpers; pruned extraction."""

from __future__ import annotations

import torch
from torch import nn

from edgeadapt.adapters.base import adapted_layers, swap_linears
from edgeadapt.adapters.sora.config import SoraConfig
from edgeadapt.adapters.sora.layer import SoraLinear
from edgeadapt.adapters.sora.prune import prune_sora, soft_threshold
from edgeadapt.errors import ConfigError
from edgeadapt.format.types import LoraDelta


def attach_sora(model: nn.Module, names: list[str], config: SoraConfig) -> None:
    """Replace each named nn.Linear with a :class:`SoraLinear` (in place)."""
    swap_linears(model, names, lambda _n, lin: SoraLinear(lin, config.r_max, config.alpha,
                                                             config.dropout, config.gate_init))


def _sora_layers(model: nn.Module) -> list[tuple[str, SoraLinear]]:
    return [(n, m) for n, m in adapted_layers(model) if isinstance(m, SoraLinear)]


def gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The gate vectors, for SoRA's own (gate) optimizer."""
    return [layer.sora_gate for _, layer in _sora_layers(model)]


@torch.no_grad()
def sora_proximal_step(model: nn.Module, xi: float) -> None:
    """``g <- sign(g) * max(|g| - xi, 0)`` for every gate, in place (after the gate step)."""
    if xi < 0:
        raise ConfigError(f"sora: xi must be >= 0, got {xi!r}")
    for gate in gate_parameters(model):
        gate.copy_(soft_threshold(gate, xi))


def sora_l1(model: nn.Module) -> torch.Tensor:
    """``sum |g|`` over all gates (multiply by the config's ``l1`` and add to the loss)."""
    gates = gate_parameters(model)
    if not gates:
        raise ConfigError("sora_l1: no SoRA layer is attached")
    return sum(g.abs().sum() for g in gates)


def live_ranks(model: nn.Module) -> dict[str, int]:
    """Module name -> number of non-zero gates (the rank left after pruning)."""
    return {n: int((layer.sora_gate != 0).sum()) for n, layer in _sora_layers(model)}


def sora_delta(layer: SoraLinear) -> LoraDelta:
    """The pruned layer as a numpy ``LoraDelta`` (gate and alpha / r_max folded into B)."""
    A, B = prune_sora(layer.lora_A.detach().float().cpu().numpy(),
                      layer.lora_B.detach().float().cpu().numpy(),
                      layer.sora_gate.detach().float().cpu().numpy(), layer.scaling)
    return LoraDelta(A=A.copy(), B=B.astype("float32"))
