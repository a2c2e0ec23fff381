"""Unfused adapters on ExecuTorch: the variant ``.pte`` with branch parameters as mutable buffers
(the branches' math and the validation: :mod:`edgeadapt.runtime.unfused`).

The variant program (``manifest.variants[key]["executorch"]``) is the base with a LoRA or SiRA
branch on every live weight; its branch tensors are mutable buffers
(``branch_buffers``: weight -> {"lora_A" | "lora_B" | "sira_router" | "sira_A" | "sira_B":
buffer}) read by XNNPACK at run time, written from the host through ``get_attribute`` views
(:meth:`ExecutorchStore.branch_tensors`). The buffers have fixed shapes, so LoRA branches are
zero-padded to the variant's rank (larger ranks are refused by
:func:`edgeadapt.runtime.unfused.prepare_branches`).

A second program cannot alias the base program's buffers, so the variant's own live-weight
buffers hold the base values it was exported with; they are checked against the bundle's
sha256 when the program is loaded and never edited (an unfused switch returns the fused path to
the base first, so both programs then hold the same weights).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeadapt.errors import BundleError, FingerprintMismatchError
from edgeadapt.format.fingerprint import weight_sha256
from edgeadapt.format.manifest import Manifest
from edgeadapt.runtime.backends.executorch import SECTION
from edgeadapt.runtime.backends.executorch.store import ExecutorchStore
from edgeadapt.runtime.unfused import variant_spec


class EtVariantProgram:
    """A loaded variant program; ``set_branches`` writes the branch buffers in place (call with
    runs excluded), ``run`` forwards through it."""

    def __init__(self, bundle_dir: Path, manifest: Manifest, key: str) -> None:
        section = variant_spec(manifest, key, SECTION)
        variant = manifest.variants[key]
        root = bundle_dir / variant.get("dir", "")
        root = root if (root / section["file"]).is_file() else bundle_dir
        vweights = variant.get("weights", {})
        buffers, shapes, sha = {}, {}, {}
        for w, entry in manifest.weights.items():
            et = (vweights.get(w) or {}).get("executorch") or entry.executorch or {}
            if "buffer" not in et:
                raise BundleError(f"variant {key!r}: no ExecuTorch buffer for weight {w!r}")
            buffers[w], shapes[w], sha[w] = et["buffer"], tuple(entry.shape), entry.sha256
        self.key = key
        self.store = ExecutorchStore(root, section, buffers, shapes, sha, mode="live")
        for w, lw in self.store.live_weights().items():
            if weight_sha256(lw.torch_weight()) != sha[w]:
                raise FingerprintMismatchError(f"variant {key!r}: live weight {w!r} of the "
                                               "program does not hash to the bundle's base")
        self._by_buffer = {section["branch_buffers"][w][p]: arr
                           for w, params in self.store.branch_tensors().items()
                           for p, arr in params.items()}
        # This program's own copy of the task head: the engine swaps heads in the base
        # program only, so an unfused classifier adapter's head is written here too.
        self._heads = {w: lw for w, lw in self.store.live_weights().items()
                       if w in manifest.heads}
        self._head_base = {w: lw.array.copy() for w, lw in self._heads.items()}

    def check_branches(self, feeds: dict[str, np.ndarray],
                       head: dict[str, np.ndarray] | None = None) -> None:
        """BundleError unless every tensor of ``feeds`` and ``head`` fits its buffer."""
        for name, value in feeds.items():
            arr = self._by_buffer.get(name)
            if arr is None or arr.shape != value.shape:
                raise BundleError(f"variant {self.key!r}: branch buffer {name!r} "
                                  f"{None if arr is None else arr.shape} cannot take "
                                  f"{value.shape}")
        for w, lw in self._heads.items():
            value = (head or {}).get(w)
            if value is not None and tuple(value.shape) != lw.shape:
                raise BundleError(f"variant {self.key!r}: head {w!r} {value.shape} does not fit "
                                  f"{lw.shape}")

    def set_branches(self, feeds: dict[str, np.ndarray],
                     head: dict[str, np.ndarray] | None = None) -> None:
        """Write ``feeds`` (buffer name -> tensor) into the branch buffers, all checked before
        the first write (:meth:`check_branches`); buffers not named are zeroed (branch off).
        ``head`` (torch layout, validated by the engine) replaces this program's head weights;
        heads not given get their base values back."""
        self.check_branches(feeds, head)
        for name, arr in self._by_buffer.items():
            arr[...] = feeds.get(name, 0.0)
        for w, lw in self._heads.items():
            value = (head or {}).get(w)
            if value is None:
                lw.array[...] = self._head_base[w]
            else:
                lw.array[...] = value if lw.layout == "as-is" else value.T

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self.store.run(inputs)
