"""SiRA configuration."""

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
from edgeadapt.errors import ConfigError


@dataclasses.dataclass
class SiraConfig(AdapterConfig):
    """E LoRA experts of rank r per target layer, top-k routed with per-expert capacity."""

    method: ClassVar[str] = "sira"
    num_experts: int = option(4, "E: LoRA experts per adapted layer")
    r: int = option(4, "rank of each expert")
    alpha: float = option(8.0, "scale numerator: each expert's delta is multiplied by alpha / r")
    top_k: int = option(2, "experts per token, in [1, num_experts]")
    capacity_factor: float = option(1.25, "C = ceil(capacity_factor * top_k * tokens / E), > 0")
    expert_dropout: float = option(0.1, "dropout on the router probabilities in training, [0, 1)")
    aux_loss_weight: float = option(0.01, "weight of the Switch load-balancing loss, >= 0")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self.method, "num_experts", self.num_experts)
        check_positive_int(self.method, "r", self.r)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or \
                not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"sira: top_k must be an integer in [1, num_experts="
                              f"{self.num_experts}], got {self.top_k!r}")
        check_number(self.method, "alpha", self.alpha, strict=True)
        check_number(self.method, "capacity_factor", self.capacity_factor, strict=True)
        check_probability(self.method, "expert_dropout", self.expert_dropout)
        check_number(self.method, "aux_loss_weight", self.aux_loss_weight)
