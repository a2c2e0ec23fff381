"""Base models loaded offline (see :func:`load_model`), target selection and example inputs."""

from edgeadapt.models.io import LogitsModule, example_inputs, forward
from edgeadapt.models.registry import (
    REAL_MODELS,
    TINY_MODELS,
    LoadedModel,
    cache_dir,
    load_model,
)
from edgeadapt.models.targets import (
    PRESETS,
    head_weight_names,
    resolve_targets,
    target_weight_names,
)

__all__ = [
    "PRESETS", "REAL_MODELS", "TINY_MODELS", "LoadedModel", "LogitsModule", "cache_dir",
    "example_inputs", "forward", "head_weight_names", "load_model", "resolve_targets",
    "target_weight_names",
]
