"""What the benchmark compares every backend with before timing it, and feeds it.

A *subject* supplies inputs of a given (batch, seq) and the reference output of the base model
with an adapter applied. :class:`TorchSubject` is the PyTorch model of the bundle (loaded by its
registry name and checked against the bundle's weight hashes), with the adapter applied by
``edgeadapt.adapters.apply_adapter_torch`` — the same reference every parity test uses.

The parity rule: ``max |backend - reference| / max |reference| <= tol`` (default 1e-3: the
adapters' values are stored in fp16 and both sides read the same stored values, so the gap is
float32 reordering only), else :class:`~edgeadapt.errors.ParityError` — a fast wrong answer is
never timed.
"""

from __future__ import annotations

import copy
from typing import Protocol

import numpy as np

from edgeadapt.errors import BundleError, ParityError
from edgeadapt.format.manifest import Manifest
from edgeadapt.format.types import Adapter, SiraBranch

PARITY_TOL = 1e-3


class Subject(Protocol):
    name: str

    def inputs(self, batch: int, seq: int) -> dict[str, np.ndarray]: ...

    def reference(self, adapter: Adapter | None, inputs: dict[str, np.ndarray]) -> np.ndarray: ...


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    """``max |got - want| / max |want|`` (float64); inf on a shape mismatch."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return float("inf")
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def check_parity(got: np.ndarray, want: np.ndarray, what: str, tol: float = PARITY_TOL
                 ) -> float:
    """Raise ParityError unless ``got`` matches ``want`` (see module docstring); returns the
    relative error."""
    err = rel_error(got, want)
    if not err <= tol:
        raise ParityError(
            f"{what}: output differs from the PyTorch reference (max rel error {err:.3g} > "
            f"{tol:g}); refusing to time it — a stale packed weight or a broken export would "
            "look fast and be wrong")
    return err


class TorchSubject:
    """The bundle's model in PyTorch (``edgeadapt.models.load_model(manifest.model)``)."""

    def __init__(self, manifest: Manifest, seed: int = 0) -> None:
        import torch

        from edgeadapt.format.fingerprint import weight_sha256
        from edgeadapt.models import load_model

        self._torch = torch
        labels = manifest.extra.get("num_labels") or 2
        self.lm = load_model(manifest.model, num_labels=int(labels),
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
        left as it was (fused deltas are undone from a saved copy; SiRA works on a copy)."""
        from edgeadapt.adapters import apply_adapter_torch
        from edgeadapt.models import forward

        torch = self._torch
        feeds = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
        model = self.lm.model
        with torch.no_grad():
            if adapter is None:
                return forward(self.lm, feeds).numpy()
            if any(isinstance(d, SiraBranch) for d in adapter.targets.values()):
                work = copy.copy(self.lm)
                work.model = copy.deepcopy(model)
                apply_adapter_torch(work.model, adapter, scale=adapter.scale)
                return forward(work, feeds).numpy()
            params = dict(model.named_parameters())
            saved = {n: params[n].detach().clone() for n in adapter.targets}
            try:
                apply_adapter_torch(model, adapter, scale=adapter.scale)
                return forward(self.lm, feeds).numpy()
            finally:
                for n, w in saved.items():
                    params[n].copy_(w)
