"""What every adapter method shares: the config base class and the adapted-linear base layer.

An adapted layer *replaces* a target ``nn.Linear`` in its parent module and takes over the
original ``weight`` / ``bias`` Parameters under the same attribute names, so the base weight keeps
its PyTorch name (``...q_proj.weight``) and the model's state_dict, fingerprints and exporters see
the same base tensors before and after :func:`edgeadapt.adapters.attach`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from edgeadapt.errors import ConfigError


def option(default: Any, help: str) -> Any:
    """A dataclass field that carries its own help text (``field.metadata["help"]``)."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class AdapterConfig:
    """Base of the four method configs; subclasses set ``method`` and validate their fields."""

    method: ClassVar[str] = ""
    targets: str = option("qv", "preset (qv | attn | all) or a regex over nn.Linear module names")

    def __post_init__(self) -> None:
        if not isinstance(self.targets, str) or not self.targets:
            raise ConfigError(f"{self.method}: targets must be a non-empty string, got "
                              f"{self.targets!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able ``{"method": ..., **fields}``; :func:`config_from_dict` inverts it."""
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name -> help text."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def check_positive_int(method: str, name: str, value: Any, minimum: int = 1) -> None:
    """Raise ConfigError unless ``value`` is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{method}: {name} must be an integer >= {minimum}, got {value!r}")


def is_finite_number(value: Any) -> bool:
    """A real number (int or float, not a bool) that is neither NaN nor infinite."""
    return (not isinstance(value, bool) and isinstance(value, (int, float))
            and math.isfinite(value))


def check_number(method: str, name: str, value: Any, *, minimum: float = 0.0,
                 strict: bool = False) -> None:
    """Raise ConfigError unless ``value`` is a finite real number (not a bool) ``>= minimum``
    (``> minimum`` if ``strict``). NaN and +-inf are refused: they would train a NaN adapter."""
    ok = is_finite_number(value) and (value > minimum if strict else value >= minimum)
    if not ok:
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        raise ConfigError(f"{method}: {name} must be a finite number {bound}, got {value!r}")


def check_probability(method: str, name: str, value: Any) -> None:
    """Raise ConfigError unless ``0 <= value < 1`` (a dropout rate)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not 0.0 <= value < 1.0:
        raise ConfigError(f"{method}: {name} must be in [0, 1), got {value!r}")


class AdaptedLinear(nn.Module):
    """A frozen ``nn.Linear`` plus an adapter branch: ``y = x W0^T + b + delta(x)``.

    Holds the base layer's own ``weight`` (out, in) and ``bias`` (out,) Parameters (not copies).
    Subclasses register their trainable tensors with names starting with their method prefix and
    implement :meth:`forward`.

    ``quant``: None, or the base on a quantization grid
    (:class:`edgeadapt.models.quantized.WeightQuant`, taken over from a ``QuantizedLinear`` base
    or set by ``quantize_reference_``); the base then computes ``quant.linear(x, bias)``.
    """

    method: ClassVar[str] = ""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.quant = getattr(base, "quant", None)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant is not None:
            return self.quant.linear(x, self.bias)
        return F.linear(x, self.weight, self.bias)

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The adapter's own parameters and persistent buffers (what a checkpoint stores)."""
        skip = {"weight", "bias"}
        return {k: v for k, v in self.state_dict(keep_vars=True).items() if k not in skip}

    def trainable(self) -> list[nn.Parameter]:
        """Parameters for the main optimizer (default: every adapter parameter)."""
        return [p for n, p in self.named_parameters(recurse=False) if n not in ("weight", "bias")]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at dotted path ``name`` inside ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def swap_linears(model: nn.Module, names: list[str],
                 make: Callable[[str, nn.Linear], AdaptedLinear]) -> None:
    """Replace each named ``nn.Linear`` with ``make(name, linear)``."""
    for name in names:
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise ConfigError(f"target {name!r} is a {type(linear).__name__}, not an nn.Linear "
                              "(already adapted? attach once per model)")
        replace_module(model, name, make(name, linear))


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLinear]]:
    """(module name, layer) for every adapted layer in ``model``, in model order."""
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLinear):
            yield name, module
