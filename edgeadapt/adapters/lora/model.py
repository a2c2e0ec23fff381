"""Swap target nn.Linear layers for LoRA layers; extract and apply LoRA deltas (fused, or as
layers inserted from numpy)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgeadapt.adapters.base import swap_linears
from edgeadapt.adapters.lora.config import LoraConfig
from edgeadapt.adapters.lora.layer import LoraLinear
from edgeadapt.format.types import LoraDelta


def attach_lora(model: nn.Module, names: list[str], config: LoraConfig) -> None:
    """Replace each named nn.Linear with a :class:`LoraLinear` (in place)."""
    swap_linears(model, names, lambda _n, lin: LoraLinear(lin, config.r, config.alpha,
                                                             config.dropout))


def lora_delta(layer: LoraLinear) -> LoraDelta:
    """Numpy ``LoraDelta`` with alpha / r folded into B."""
    A = layer.lora_A.detach().float().cpu().numpy().copy()
    B = (layer.lora_B.detach().float() * layer.scaling).cpu().numpy()
    return LoraDelta(A=A, B=B)


@torch.no_grad()
def fuse_lora(weight: torch.Tensor, delta: LoraDelta, scale: float) -> None:
    """``W += scale * B @ A`` in place (B carries alpha / r)."""
    A = torch.from_numpy(np.asarray(delta.A, dtype=np.float32)).to(weight.device)
    B = torch.from_numpy(np.asarray(delta.B, dtype=np.float32)).to(weight.device)
    weight += (scale * (B @ A)).to(weight.dtype)


def insert_lora(linear: nn.Linear, delta: LoraDelta, scale: float = 1.0) -> LoraLinear:
    """A :class:`LoraLinear` (eval mode) around ``linear`` holding ``delta`` unfused:
    ``y = linear(x) + scale * (x A^T) B^T`` (alpha / r = 1: B carries it). How LoRA runs on a
    quantized base, whose ``linear`` computes on its grid (the layer takes its ``quant``
    over)."""
    with torch.random.fork_rng(devices=[]):  # the init is overwritten: leave the RNG alone
        layer = LoraLinear(linear, delta.rank, alpha=float(delta.rank))
    dev, dt = linear.weight.device, linear.weight.dtype
    with torch.no_grad():
        layer.lora_A.copy_(torch.as_tensor(np.asarray(delta.A), dtype=dt, device=dev))
        layer.lora_B.copy_(torch.as_tensor(np.asarray(delta.B), dtype=dt, device=dev) * scale)
    for p in (layer.lora_A, layer.lora_B):
        p.requires_grad_(False)
    return layer.eval()
