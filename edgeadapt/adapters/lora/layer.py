"""The LoRA layer."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from edgeadapt.adapters.base import AdaptedLinear


def init_lora_a(A: torch.Tensor) -> None:
    """Kaiming-uniform with a = sqrt(5), as nn.Linear initialises its weight."""
    nn.init.kaiming_uniform_(A, a=math.sqrt(5))


def init_lora_b(B: torch.Tensor) -> None:
    """Zeros, so the adapted model starts exactly at the base model."""
    nn.init.zeros_(B)


class LoraLinear(AdaptedLinear):
    """``y = x W0^T + b + (alpha / r) * dropout(x) A^T B^T``.

    x: (..., in) -> y: (..., out).  W0: (out, in) frozen.  lora_A: (r, in) kaiming-uniform.
    lora_B: (out, r) zeros.  Dropout (rate ``dropout``) acts on the branch input in training only.
    """

    method: ClassVar[str] = "lora"

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__(base)
        self.r = r
        self.scaling = alpha / r
        dtype, device = base.weight.dtype, base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, dtype=dtype, device=device))
        init_lora_a(self.lora_A)
        init_lora_b(self.lora_B)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(x) @ self.lora_A.T
        return self.base_forward(x) + (h @ self.lora_B.T) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """The fused delta ``(alpha / r) B A``: (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scaling
