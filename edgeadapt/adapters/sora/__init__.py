"""SoRA: a gated LoRA of rank r_max whose gates are sparsified by a proximal step."""

from edgeadapt.adapters.sora.config import SoraConfig
from edgeadapt.adapters.sora.layer import SoraLinear
from edgeadapt.adapters.sora.model import (
    gate_parameters,
    live_ranks,
    sora_l1,
    sora_proximal_step,
)
from edgeadapt.adapters.sora.prune import prune_sora, soft_threshold

__all__ = ["SoraConfig", "SoraLinear", "gate_parameters", "live_ranks", "prune_sora",
           "soft_threshold", "sora_l1", "sora_proximal_step"]
