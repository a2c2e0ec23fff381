"""What the benchmark compares every backend with before timing it, and feeds it.

A *subject* supplies inputs of a given (batch, seq) and the reference output of the base model
with an adapter applied. :class:`TorchSubject` is the PyTorch model of the bundle (loaded by its
registry name and checked against the bundle's weight hashes) carrying the adapter
(:func:`edgeadapt.adapters.reference.reference_logits`) — the same reference every parity test
uses. The rule applied to the two outputs: :mod:`edgeadapt.bench.parity`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from edgeadapt.errors import BundleError
from edgeadapt.format.manifest import Manifest, model_location
from edgeadapt.format.types import Adapter


class Subject(Protocol):
    name: str

    def inputs(self, batch: int, seq: int) -> dict[str, np.ndarray]: ...

    def reference(self, adapter: Adapter | None, inputs: dict[str, np.ndarray]) -> np.ndarray: ...


class TorchSubject:
    """The bundle's model in PyTorch (``edgeadapt.models.load_model`` of the bundle's model,
    a local directory resolved against ``bundle``: :func:`~edgeadapt.format.manifest.
    model_location`)."""

    def __init__(self, manifest: Manifest, bundle: str | Path = ".", seed: int = 0) -> None:
        from edgeadapt.format.fingerprint import weight_sha256
        from edgeadapt.models import load_model

        labels = manifest.extra.get("num_labels") or 2
        self.lm = load_model(model_location(manifest, bundle), num_labels=int(labels),
                             seed=int(manifest.extra.get("seed", seed)))
        self.name = manifest.model
        params = dict(self.lm.model.named_parameters())
        for wname, entry in manifest.weights.items():
            p = params.get(wname)
            if p is None or weight_sha256(p.detach().numpy()) != entry.sha256:
                raise BundleError(
                    f"the PyTorch model {manifest.model!r} does not match the bundle's weight "
                    f"{wname!r}; the benchmark needs the exact base to check parity")

    def inputs(self, batch: int, seq: int) -> dict[str, np.ndarray]:
        from edgeadapt.models import example_inputs

        return {k: v.numpy() for k, v in example_inputs(self.lm, batch, seq).items()}

    def reference(self, adapter: Adapter | None, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Logits of the base model with ``adapter`` applied (at its own scale); the model is
        left as it was."""
        from edgeadapt.adapters.reference import reference_logits

        return reference_logits(self.lm, adapter, inputs)
