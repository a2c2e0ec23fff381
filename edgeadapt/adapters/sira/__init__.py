"""SiRA: a sparse mixture of LoRA experts with top-k routing and per-expert capacity."""

from edgeadapt.adapters.sira.config import SiraConfig
from edgeadapt.adapters.sira.layer import SiraLinear, expert_capacity, route
from edgeadapt.adapters.sira.model import sira_aux_loss

__all__ = ["SiraConfig", "SiraLinear", "expert_capacity", "route", "sira_aux_loss"]
