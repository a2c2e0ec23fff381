"""Swap target nn.Linear layers for LoRA layers; extract and apply LoRA deltas."""

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
