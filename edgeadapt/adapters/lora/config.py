"""LoRA configuration."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from edgeadapt.adapters.base import (
    AdapterConfig,
    check_number,
    check_positive_int,
    check_probability,
    option,
)


@dataclasses.dataclass
class LoraConfig(AdapterConfig):
    """Low-rank adapter ``delta W = (alpha / r) B A`` on every target nn.Linear."""

    method: ClassVar[str] = "lora"
    r: int = option(8, "rank of A (r, in) and B (out, r)")
    alpha: float = option(16.0, "scale numerator: the delta is multiplied by alpha / r")
    dropout: float = option(0.0, "dropout on the LoRA branch's input during training, in [0, 1)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self.method, "r", self.r)
        check_number(self.method, "alpha", self.alpha, strict=True)
        check_probability(self.method, "dropout", self.dropout)
