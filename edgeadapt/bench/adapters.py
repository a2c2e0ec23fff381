"""The adapters a benchmark run uses: the bundle's own, completed with synthetic ones.

A run needs two fused SHiRA adapters and two fused LoRA adapters on the live weights (a full
switch goes from one to the other), a pruned SoRA and a SiRA for the unfused variants. What the
bundle lacks is synthesised (:mod:`edgeadapt.bench.synth`), written as ``.eadp`` files into a
scratch directory and registered on the *in-memory* manifest of each runtime the benchmark
loads — the bundle on disk is never modified.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeadapt.bench.synth import equal_rank, synth_lora, synth_shira, synth_sira
from edgeadapt.format.adapter_file import read_adapter, write_adapter
from edgeadapt.format.manifest import AdapterEntry, Manifest
from edgeadapt.format.types import Adapter, Delta, ShiraDelta


@dataclass
class AdapterSet:
    """name -> Adapter (numpy, as read back from its file) and its registry entry."""

    adapters: dict[str, Adapter] = field(default_factory=dict)
    entries: dict[str, AdapterEntry] = field(default_factory=dict)
    synthetic: list[str] = field(default_factory=list)

    def of(self, method: str, fused: bool = True) -> list[str]:
        """Names of this method's adapters, fused ones (no graph variant) or unfused ones."""
        return sorted(n for n, e in self.entries.items()
                      if e.method == method and (e.variant is None) == fused)

    def describe(self) -> dict[str, dict]:
        """name -> {method, variant, synthetic, params} for the report; ``params``: the values
        the adapter holds (SHiRA positions, LoRA / SiRA tensor entries)."""
        return {n: {"method": e.method, "variant": e.variant, "synthetic": n in self.synthetic,
                    "params": sum(_values(d) for d in self.adapters[n].targets.values())}
                for n, e in self.entries.items()}

    def register(self, manifest: Manifest) -> None:
        """Add the synthetic entries to ``manifest`` (in memory)."""
        for name in self.synthetic:
            manifest.adapters.setdefault(name, self.entries[name])


def _values(delta: Delta) -> int:
    if isinstance(delta, ShiraDelta):
        return int(delta.indices.size)
    return int(sum(np.asarray(getattr(delta, k)).size for k in ("router", "A", "B")
                   if hasattr(delta, k)))


def collect(bundle_dir: Path, manifest: Manifest, scratch: Path, *, density: float = 0.01,
            lora_rank: int | None = 16, sora_rank: int = 4, seed: int = 0) -> AdapterSet:
    """The bundle's adapters plus synthetic ones for whatever a run needs and it lacks.
    ``lora_rank`` None: the synthetic LoRA adapters hold as many values as the first SHiRA
    adapter has positions (:func:`~edgeadapt.bench.synth.equal_rank`)."""
    out = AdapterSet()
    for name, entry in manifest.adapters.items():
        out.adapters[name] = read_adapter(bundle_dir / entry.file, manifest)
        out.entries[name] = entry
    shapes = {n: tuple(w.shape) for n, w in manifest.weights.items()}
    sha = {n: w.sha256 for n, w in manifest.weights.items()}

    def add(name: str, adapter: Adapter, variant: str | None = None) -> None:
        path = write_adapter(scratch / f"{name}.eadp", adapter, value_dtype="float32")
        out.adapters[name] = read_adapter(path, manifest)
        out.entries[name] = AdapterEntry(file=str(path.resolve()), method=adapter.method,
                                         variant=variant, info={"synthetic": True})
        out.synthetic.append(name)

    for k in range(2 - len(out.of("shira"))):
        add(f"bench-shira-{k}", synth_shira(shapes, sha, density=density, seed=seed + 1 + k))
    if lora_rank is None:
        first = out.adapters[out.of("shira")[0]]
        lora_rank = equal_rank(shapes, sum(int(d.indices.size) for d in first.targets.values()))
    for k in range(2 - len(out.of("lora"))):
        add(f"bench-lora-{k}", synth_lora(shapes, sha, rank=lora_rank, seed=seed + 11 + k))
    lora_variant = next((key for key in manifest.variants if key.startswith("lora-")), None)
    if lora_variant is not None:
        if not out.of("lora", fused=False):
            add("bench-lora-unfused", synth_lora(shapes, sha, rank=lora_rank, seed=seed + 21),
                lora_variant)
        if not out.of("sora", fused=False):
            add("bench-sora-unfused", synth_lora(shapes, sha, rank=sora_rank, seed=seed + 22,
                                                 method="sora"), lora_variant)
    sira_variant = next((key for key in manifest.variants if key.startswith("sira-")), None)
    if sira_variant is not None and not out.of("sira", fused=False):
        _, experts, rank, top_k, cf = manifest.variants[sira_variant]["branch"]["spec"]
        add("bench-sira", synth_sira(shapes, sha, experts=int(experts), rank=int(rank),
                                     top_k=int(top_k), capacity_factor=float(cf),
                                     seed=seed + 31), sira_variant)
    return out
