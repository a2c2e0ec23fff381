"""Training: ``train(TrainConfig(...), out)`` writes a run directory; ``load_run`` reads it back.

The run directory's format is :mod:`edgeadapt.format.run_dir`; the ``edgeadapt train`` command
lives in :mod:`.cli`.
"""

from edgeadapt.train.run import excluded_positions, load_run, save_run
from edgeadapt.train.trainer import (
    METHODS,
    TrainConfig,
    TrainResult,
    adapter_config,
    describe,
    train,
)

__all__ = ["METHODS", "TrainConfig", "TrainResult", "adapter_config", "describe",
           "excluded_positions", "load_run", "save_run", "train"]
