"""Training: ``train(TrainConfig(...), out)`` writes a run directory; ``load_run`` reads it back.

The ``edgeadapt train`` and ``edgeadapt quickstart`` commands live in :mod:`.cli`.
"""

from edgeadapt.train.run import load_run, save_run
from edgeadapt.train.trainer import (
    METHODS,
    TrainConfig,
    TrainResult,
    adapter_config,
    describe,
    train,
)

__all__ = ["METHODS", "TrainConfig", "TrainResult", "adapter_config", "describe", "load_run",
           "save_run", "train"]
