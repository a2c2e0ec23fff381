"""LoRA: ``y = W0 x + (alpha / r) B A x`` (the baseline every sparse method is compared with)."""

from edgeadapt.adapters.lora.config import LoraConfig
from edgeadapt.adapters.lora.layer import LoraLinear

__all__ = ["LoraConfig", "LoraLinear"]
