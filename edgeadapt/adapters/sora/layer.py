"""The SoRA layer: LoRA with a gate vector between A and B."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from edgeadapt.adapters.lora.layer import LoraLinear


class SoraLinear(LoraLinear):
    """``y = x W0^T + b + ((dropout(x) A^T) * g) B^T * (alpha / r_max)``.

    x: (..., in) -> y: (..., out).  lora_A: (r_max, in), lora_B: (out, r_max) as in LoRA;
    sora_gate: (r_max,), randn (as the reference code) or ones. The gate is trained by its own
    optimizer followed by a proximal step (:func:`edgeadapt.adapters.sora.sora_proximal_step`),
    so it is *not* in :meth:`trainable`.
    """

    method: ClassVar[str] = "sora"

    def __init__(self, base: nn.Linear, r_max: int, alpha: float, dropout: float = 0.0,
                 gate_init: str = "randn") -> None:
        super().__init__(base, r_max, alpha, dropout)
        dtype, device = base.weight.dtype, base.weight.device
        init = torch.randn if gate_init == "randn" else torch.ones
        self.sora_gate = nn.Parameter(init(r_max, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = (self.dropout(x) @ self.lora_A.T) * self.sora_gate
        return self.base_forward(x) + (h @ self.lora_B.T) * self.scaling

    def trainable(self) -> list[nn.Parameter]:
        return [self.lora_A, self.lora_B]

    def delta_weight(self) -> torch.Tensor:
        """The fused delta ``B diag(g) A * alpha / r_max``: (out, in)."""
        return (self.lora_B * self.sora_gate) @ self.lora_A * self.scaling
