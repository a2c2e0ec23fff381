"""SHiRA: train K sparse entries of the base weights themselves, ``W = W0 + S`` (S sparse)."""

from edgeadapt.adapters.shira.config import ShiraConfig
from edgeadapt.adapters.shira.layer import ShiraLinear
from edgeadapt.adapters.shira.masks import MASK_KINDS, mask_budget, select_mask

__all__ = ["MASK_KINDS", "ShiraConfig", "ShiraLinear", "mask_budget", "select_mask"]
