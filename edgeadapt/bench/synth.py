"""Random adapters of the right shapes, for bundles that ship none (or too few) to benchmark.

Latency does not depend on trained values, only on shapes, counts and positions, so the
benchmark may synthesise what a bundle lacks. Every synthesised adapter carries
``meta["synthetic"] = True`` and the report lists them.

- SHiRA: per weight (out, in), ``K = max(1, round(density * out * in))`` positions drawn
  uniformly without replacement (the paper's 1-2% of each weight), values N(0, 0.01^2).
- LoRA / pruned SoRA: ``A ~ N(0, 1/in)`` (r, in), ``B ~ N(0, 0.01^2)`` (out, r).
- SiRA: E experts of rank r, router ``N(0, 1/in)`` (E, in), top_k, capacity_factor.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from edgeadapt.format.types import Adapter, LoraDelta, ShiraDelta, SiraBranch

Shapes = Mapping[str, tuple[int, int]]


def shira_count(shape: tuple[int, int], density: float) -> int:
    """Positions per (out, in) weight: ``max(1, round(density * out * in))``."""
    return max(1, round(density * shape[0] * shape[1]))


def equal_rank(shapes: Shapes, params: int) -> int:
    """The LoRA rank whose ``rank * sum(out + in)`` over ``shapes`` comes nearest ``params``
    values (at least 1): a LoRA of the same size as a SHiRA adapter of ``params`` positions."""
    per_rank = sum(out_f + in_f for out_f, in_f in shapes.values())
    return max(1, round(params / per_rank))


def synth_shira(shapes: Shapes, sha256: Mapping[str, str], *, density: float = 0.01,
                seed: int = 0) -> Adapter:
    """A random SHiRA adapter on every weight of ``shapes`` (see the module docstring)."""
    rng = np.random.default_rng(seed)
    targets = {}
    for name, (out_f, in_f) in shapes.items():
        k = shira_count((out_f, in_f), density)
        idx = np.sort(rng.choice(out_f * in_f, size=k, replace=False)).astype(np.int64)
        targets[name] = ShiraDelta(idx, (0.01 * rng.standard_normal(k)).astype(np.float32))
    return Adapter("shira", targets, dict(shapes), dict(sha256),
                   meta={"synthetic": True, "density": density, "seed": seed})


def synth_lora(shapes: Shapes, sha256: Mapping[str, str], *, rank: int = 16, seed: int = 0,
               method: str = "lora") -> Adapter:
    """A random LoRA (or, with ``method="sora"``, pruned-SoRA) adapter of rank ``rank``."""
    rng = np.random.default_rng(seed)
    targets = {}
    for name, (out_f, in_f) in shapes.items():
        A = (rng.standard_normal((rank, in_f)) / np.sqrt(in_f)).astype(np.float32)
        B = (0.01 * rng.standard_normal((out_f, rank))).astype(np.float32)
        targets[name] = LoraDelta(A, B)
    return Adapter(method, targets, dict(shapes), dict(sha256),
                   meta={"synthetic": True, "rank": rank, "seed": seed})


def synth_sira(shapes: Shapes, sha256: Mapping[str, str], *, experts: int = 4, rank: int = 4,
               top_k: int = 2, capacity_factor: float = 1.25, seed: int = 0) -> Adapter:
    """A random SiRA adapter: ``experts`` LoRA experts of rank ``rank`` per weight."""
    rng = np.random.default_rng(seed)
    targets = {}
    for name, (out_f, in_f) in shapes.items():
        router = (rng.standard_normal((experts, in_f)) / np.sqrt(in_f)).astype(np.float32)
        A = (rng.standard_normal((experts, rank, in_f)) / np.sqrt(in_f)).astype(np.float32)
        B = (0.01 * rng.standard_normal((experts, out_f, rank))).astype(np.float32)
        targets[name] = SiraBranch(router, A, B, top_k, capacity_factor)
    return Adapter("sira", targets, dict(shapes), dict(sha256),
                   meta={"synthetic": True, "experts": experts, "rank": rank, "seed": seed})
