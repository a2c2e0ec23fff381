"""SHiRA configuration."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np

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
    exclude: dict[str, tuple[int, ...]] | None = option(
        None, "module name -> flat positions (row * in_features + col) this mask avoids, e.g. "
              "another SHiRA adapter's (non-overlapping masks): "
              "edgeadapt.train.excluded_positions(run_dir, model) reads them from a run")
    exclude_run: str | None = option(
        None, "the run directory `exclude` was read from: a record (adapter.json keeps it in "
              "place of the positions), never read by the config")

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
        if self.exclude_run is not None and not isinstance(self.exclude_run, str):
            raise ConfigError(f"shira: exclude_run must be a path (string), got "
                              f"{self.exclude_run!r}")
        if self.exclude is not None:
            if not isinstance(self.exclude, dict):
                raise ConfigError(f"shira: exclude must map module names to flat positions, "
                                  f"got {type(self.exclude).__name__}")
            self.exclude = {name: _positions(name, value) for name, value in self.exclude.items()}

    def to_dict(self) -> dict[str, Any]:
        """As :meth:`AdapterConfig.to_dict`, except that positions read from a run are not
        written out: ``exclude_run`` records where they came from (that run's
        adapter.safetensors holds them) and ``exclude`` is written as null."""
        d = super().to_dict()
        if self.exclude_run is not None:
            d["exclude"] = None
        return d


def _positions(name: Any, value: Any) -> tuple[int, ...]:
    """``exclude[name]`` as sorted distinct ints: a 1-D integer sequence of positions >= 0."""
    arr = np.asarray(value)
    if not isinstance(name, str) or arr.ndim != 1 or (
            arr.size and (arr.dtype.kind not in "iu" or int(arr.min()) < 0)):
        raise ConfigError(f"shira: exclude[{name!r}] must be a 1-D list of flat positions "
                          f"(integers >= 0) under a module name")
    return tuple(np.unique(arr).tolist())
