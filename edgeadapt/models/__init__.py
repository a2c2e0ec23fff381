"""Base models loaded offline (see :func:`load_model`), target selection and example inputs."""

from edgeadapt.models.io import LogitsModule, example_inputs, forward
from edgeadapt.models.registry import (
    REAL_MODELS,
    TINY_MODELS,
    LoadedModel,
    cache_dir,
    load_model,
)
from edgeadapt.models.targets import PRESETS, resolve_targets, target_weight_names

__all__ = [
    "PRESETS", "REAL_MODELS", "TINY_MODELS", "LoadedModel", "LogitsModule", "cache_dir",
    "example_inputs", "forward", "load_model", "resolve_targets", "target_weight_names",
]
