"""SoRA configuration."""

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

GATE_INITS = ("randn", "ones")


@dataclasses.dataclass
class SoraConfig(AdapterConfig):
    """Gated LoRA ``delta(x) = ((x A^T) * g) B^T * alpha / r_max``; zero gates are pruned."""

    method: ClassVar[str] = "sora"
    r_max: int = option(8, "starting rank (length of the gate vector g)")
    alpha: float = option(16.0, "scale numerator: the delta is multiplied by alpha / r_max")
    dropout: float = option(0.0, "dropout on the branch input during training, in [0, 1)")
    xi: float = option(3e-4, "proximal soft-threshold per gate step: g <- sign(g) max(|g|-xi, 0)")
    l1: float = option(0.0, "weight of an optional L1 penalty on the gates (sora_l1)")
    gate_init: str = option("randn", "gate initialisation: randn (reference code) | ones")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self.method, "r_max", self.r_max)
        check_number(self.method, "alpha", self.alpha, strict=True)
        check_probability(self.method, "dropout", self.dropout)
        for name in ("xi", "l1"):
            check_number(self.method, name, getattr(self, name))
        if self.gate_init not in GATE_INITS:
            raise ConfigError(f"sora: gate_init must be one of {', '.join(GATE_INITS)}, got "
                              f"{self.gate_init!r}")
