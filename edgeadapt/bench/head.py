"""The fields every bench report opens with, forward or generation: the model and its live
weights, the machine, the threads each backend ran with and how it read the live weights."""

from __future__ import annotations

import numpy as np

from edgeadapt.bench.host import cpu_name
from edgeadapt.format.manifest import Manifest


def report_head(manifest: Manifest, threads: int, threads_by_backend: dict[str, int | None],
                live_form_by_backend: dict[str, str]) -> dict:
    """``model``, ``device`` (the CPU), ``targets_spec``, ``live_weights``, ``live_params``,
    ``threads`` (asked for), ``threads_by_backend`` and ``live_form_by_backend`` (keyed
    ``backend:device``)."""
    return {"model": manifest.model, "device": cpu_name(),
            "targets_spec": manifest.targets_spec, "live_weights": len(manifest.weights),
            "live_params": int(sum(np.prod(w.shape) for w in manifest.weights.values())),
            "threads": threads, "threads_by_backend": threads_by_backend,
            "live_form_by_backend": live_form_by_backend}
