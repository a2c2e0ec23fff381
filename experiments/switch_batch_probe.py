"""A quantized ExecuTorch bundle: the cached switch between two synthetic SHiRA adapters (1% of
every live weight), its weights written as one batch (one native call, ``scatter.Batch``)
against one scatter per weight, in interleaved rounds; prints the p50s and the paired ratio.

    python -m experiments.switch_batch_probe bundles/quant-smollm2/executorch-int4 [ROUNDS]
"""

from __future__ import annotations

import sys

import numpy as np

from edgeadapt.bench.synth import synth_shira
from edgeadapt.format import read_manifest
from edgeadapt.runtime import load
from edgeadapt.timer import time_interleaved


def main(bundle: str, rounds: int = 60) -> None:
    manifest = read_manifest(bundle)
    shapes = {w: tuple(e.shape) for w, e in manifest.weights.items()}
    sha = {w: e.sha256 for w, e in manifest.weights.items()}
    rt = load(bundle, backend="executorch", mode="live", threads=2)
    adapters = [synth_shira(shapes, sha, density=0.01, seed=s) for s in (0, 1)]
    preps = [rt.engine.prepare(a, f"s{i}") for i, a in enumerate(adapters)]
    pair = [[(preps[1], 1.0)], [(preps[0], 1.0)]]
    count = [0]

    def switch() -> None:
        rt.engine.switch(pair[count[0] % 2])
        count[0] += 1

    for _ in range(4):  # both directions cached
        switch()
    cached = rt.engine._pairs[-1]
    print("batch", cached.to_b.batch is not None, "span", cached.to_b.scatter is not None)
    batches = (cached.to_b.batch, cached.to_a.batch)

    def per_weight() -> None:
        cached.to_b.batch = cached.to_a.batch = None
        try:
            switch()
        finally:
            cached.to_b.batch, cached.to_a.batch = batches

    samples = time_interleaved({"batch": switch, "per-weight": per_weight}, repeats=rounds,
                               warmup=4)
    for name, ms in samples.items():
        print(f"{name} p50 {np.median(ms):.3f} ms")
    ratio = np.median(np.array(samples["batch"]) / np.array(samples["per-weight"]))
    print(f"batch / per-weight, paired median {ratio:.3f}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 60)
