"""Adapter methods (LoRA, SHiRA, SoRA, SiRA) as a few verbs over plain config dataclasses.

    names = attach(model, ShiraConfig(mask="snip"), calib=lambda: loss_fn(model))
    opt = torch.optim.AdamW(trainable_parameters(model), lr=...)
    adapter = extract(model)                      # numpy edgeadapt.format.types.Adapter
    apply_adapter_torch(base_model, adapter)      # the PyTorch reference of applying it

Each method lives in its own folder with the same faces: ``config.py`` (dataclass, validated),
``layer.py`` (the nn.Module, math in its docstring), ``model.py`` (walks a model, swaps layers).
"""

from edgeadapt.adapters.api import (
    CONFIGS,
    adapter_state,
    apply_adapter_torch,
    attach,
    config_from_dict,
    extract,
    load_adapter_state,
    trainable_parameters,
)
from edgeadapt.adapters.base import AdaptedLinear, AdapterConfig, adapted_layers
from edgeadapt.adapters.lora import LoraConfig, LoraLinear
from edgeadapt.adapters.shira import MASK_KINDS, ShiraConfig, ShiraLinear
from edgeadapt.adapters.sira import SiraConfig, SiraLinear, sira_aux_loss
from edgeadapt.adapters.sora import (
    SoraConfig,
    SoraLinear,
    gate_parameters,
    live_ranks,
    prune_sora,
    sora_l1,
    sora_proximal_step,
)

__all__ = [
    "CONFIGS", "MASK_KINDS", "AdaptedLinear", "AdapterConfig", "LoraConfig", "LoraLinear",
    "ShiraConfig", "ShiraLinear", "SiraConfig", "SiraLinear", "SoraConfig", "SoraLinear",
    "adapted_layers", "adapter_state", "apply_adapter_torch", "attach", "config_from_dict",
    "extract", "gate_parameters", "live_ranks", "load_adapter_state", "prune_sora",
    "sira_aux_loss", "sora_l1", "sora_proximal_step", "trainable_parameters",
]
