"""Unfused forward cases on ONNX Runtime (CPU): the bundle's branch variant graphs (LoRA, SiRA).

Each variant graph is the base with a branch on every live weight; its live-weight inputs are
made prepacked initializers (base values) and the adapter's tensors are fed per run
(:class:`~edgeadapt.bench.ort_adapter.OrtBranchSession`). Pruned SoRA runs through the LoRA
variant (its rank dimension is dynamic). The LoRA variant also serves ONNX Runtime's own adapter
API, the ``ort-lora-adapter`` peer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeadapt.bench.adapters import AdapterSet
from edgeadapt.bench.ort_adapter import (
    OrtBranchSession,
    branch_feeds,
    onnx_load_errors,
    write_ort_adapter,
)
from edgeadapt.errors import BundleError
from edgeadapt.format.manifest import Manifest

Case = tuple[Callable[[dict], np.ndarray], str | None]  # (run(inputs), adapter name or None)


@dataclass
class OrtAdapterPeer:
    """ONNX Runtime's adapter API on the LoRA variant: its session, the ``.onnx_adapter`` files
    of two LoRA adapters and those adapters' names (a switch cycles between the two files)."""

    session: OrtBranchSession
    files: list[Path]
    adapter_names: list[str]


def _variant_session(bundle: Path, manifest: Manifest, key: str, threads: int
                     ) -> tuple[OrtBranchSession, dict]:
    from safetensors.numpy import load_file

    v = manifest.variants[key]
    section = v.get("onnxruntime")
    if not section or "file" not in section:
        raise BundleError(f"variant {key!r} has no onnx section")
    root = bundle / v.get("dir", "")
    root = root if (root / section["file"]).is_file() else bundle
    live_file = section.get("live_weights") or section.get("live_weights_file")
    if not live_file:
        raise BundleError(f"variant {key!r}: no live-weights file named")
    tensors = load_file(str(root / live_file))
    names = []
    for w, entry in manifest.weights.items():
        onnx = (v.get("weights", {}).get(w, {}) or {}).get("onnxruntime") or entry.onnxruntime or {}
        if onnx.get("name") not in tensors:
            raise BundleError(f"variant {key!r}: live weight {w!r} not in {live_file}")
        names.append(onnx["name"])
    session = OrtBranchSession(root / section["file"], {n: tensors[n] for n in names}, threads)
    return session, section.get("branch_inputs", {})


def _failure(exc: BaseException) -> str:
    return f"the variant could not be loaded: {type(exc).__name__}: {exc}"


# what a variant that cannot be loaded raises: a bundle problem (a missing or corrupt variant
# file: BundleError, OSError, protobuf's DecodeError, ONNX Runtime's errors), reported as a skip
# of that variant alone (MissingPackageError: the backend itself is unavailable, not skipped here)
def _variant_errors() -> tuple[type[BaseException], ...]:
    return (BundleError, OSError, ValueError, RuntimeError, *onnx_load_errors(
        ("Fail", "InvalidProtobuf", "InvalidGraph", "NoSuchFile", "InvalidArgument")))


def unfused_cases(bundle: Path, manifest: Manifest, aset: AdapterSet, scratch: Path,
                  threads: int) -> tuple[dict[str, Case], OrtAdapterPeer | None, dict[str, str]]:
    """(variant -> (run, adapter name), the ort-adapter peer or None, what was skipped -> why).
    A variant whose graph cannot be loaded is skipped with the reason; the others are still
    measured."""
    errors = _variant_errors()
    cases: dict[str, Case] = {}
    skipped: dict[str, str] = {}
    peer = None
    lora_key = next((k for k in manifest.variants if k.startswith("lora-")), None)
    if lora_key is None:
        for what in ("lora-unfused", "sora-unfused", "ort-lora-adapter"):
            skipped[what] = "the bundle has no LoRA branch variant (edgeadapt export adapter)"
    else:
        try:
            sess, names = _variant_session(bundle, manifest, lora_key, threads)
        except errors as exc:
            sess = None
            for what in ("lora-unfused", "sora-unfused", "ort-lora-adapter"):
                skipped[what] = _failure(exc)
        if sess is not None:
            for variant, method in (("lora-unfused", "lora"), ("sora-unfused", "sora")):
                chosen = aset.of(method, fused=False)
                if not chosen:
                    skipped[variant] = f"no unfused {method} adapter"
                    continue
                feeds = branch_feeds(aset.adapters[chosen[0]], names)
                cases[variant] = ((lambda x, s=sess, f=feeds: s.run(x, f)), chosen[0])
            try:
                loras = (aset.of("lora", fused=False) + aset.of("lora"))[:2]
                files = [write_ort_adapter(scratch / f"{n}.onnx_adapter", aset.adapters[n],
                                           names) for n in loras]
                adapter_sess, _ = _variant_session(bundle, manifest, lora_key, threads)
                adapter_sess.activate(adapter_sess.load(files[0]))
            except errors as exc:
                skipped["ort-lora-adapter"] = _failure(exc)
            else:
                cases["ort-lora-adapter"] = ((lambda x, s=adapter_sess: s.run(x)), loras[0])
                peer = OrtAdapterPeer(adapter_sess, files, loras)
    sira_key = next((k for k in manifest.variants if k.startswith("sira-")), None)
    sira = aset.of("sira", fused=False)
    if sira_key is None or not sira:
        skipped["sira-unfused"] = "the bundle has no SiRA branch variant"
    else:
        try:
            sess, names = _variant_session(bundle, manifest, sira_key, threads)
        except errors as exc:
            skipped["sira-unfused"] = _failure(exc)
        else:
            feeds = branch_feeds(aset.adapters[sira[0]], names)
            cases["sira-unfused"] = ((lambda x, s=sess, f=feeds: s.run(x, f)), sira[0])
    return cases, peer, skipped
