"""SHiRA configuration."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from edgeadapt.adapters.base import AdapterConfig, check_positive_int, option
from edgeadapt.adapters.shira.masks import MASK_KINDS, STRUCT_AXES
from edgeadapt.errors import ConfigError, UnknownNameError


@dataclasses.dataclass
class ShiraConfig(AdapterConfig):
    """Sparse high-rank adapter: K trainable entries per target weight at fixed mask positions."""

    method: ClassVar[str] = "shira"
    mask: str = option("random", "mask kind: random | wm (top |W|) | grad (top |dL/dW|) | "
                                 "snip (top |W * dL/dW|) | struct (rows/cols + diagonal)")
    density: float = option(0.01, "fraction of each target matrix trained, in (0, 1]; "
                                  "ignored when budget_rank is set")
    budget_rank: int | None = option(None, "if set, K = budget_rank * (out + in) per matrix: "
                                           "the parameter count of a LoRA of that rank")
    struct_axis: str = option("row", "struct mask: every f-th 'row' or 'col', plus the diagonal")
    seed: int = option(0, "seed of the random mask (target i uses seed + i)")
    exclude_run: str | None = option(None, "run directory of another SHiRA adapter whose "
                                           "positions this mask avoids (non-overlapping masks)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mask not in MASK_KINDS:
            raise UnknownNameError(f"shira: unknown mask kind {self.mask!r}; "
                                   f"choose one of {', '.join(MASK_KINDS)}")
        if (isinstance(self.density, bool) or not isinstance(self.density, (int, float))
                or not 0.0 < self.density <= 1.0):
            raise ConfigError(f"shira: density must be in (0, 1], got {self.density!r}")
        if self.budget_rank is not None:
            check_positive_int(self.method, "budget_rank", self.budget_rank)
        if self.struct_axis not in STRUCT_AXES:
            raise ConfigError(f"shira: struct_axis must be 'row' or 'col', got "
                              f"{self.struct_axis!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"shira: seed must be an integer, got {self.seed!r}")
