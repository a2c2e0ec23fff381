"""The switch under load (the bench's ``--load-*`` rows: :func:`edgeadapt.bench.generation.load.
time_under_load`) on an ONNX Runtime ``--generate`` bundle, the decoder reading every constant
weight with edgeadapt's kernel (``every_constant``, the runtime's choice) against the decoder
leaving them to MLAS, in alternating blocks of ``--switches`` (``--blocks`` each): whether the
kernel moves the switch's tail.

    .venv/bin/python -m experiments.switch_load_probe bundles/smollm2-generate
        [--switches 100] [--interval-ms 1000] [--blocks 2]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> None:
    from edgeadapt.bench.adapters import collect
    from edgeadapt.bench.backends import parse_targets
    from edgeadapt.bench.generation.load import time_under_load
    from edgeadapt.format.manifest import read_manifest
    from edgeadapt.runtime import load
    from experiments.constant_kernel_probe import every_constant

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--switches", type=int, default=100)
    ap.add_argument("--interval-ms", type=float, default=1000.0)
    ap.add_argument("--blocks", type=int, default=2)
    args = ap.parse_args(argv)
    adapters = collect(args.bundle, read_manifest(args.bundle), Path(tempfile.mkdtemp()),
                       lora_rank=None)
    target = parse_targets(["onnxruntime"])[0]
    prompt = np.random.default_rng(0).integers(100, 30000, 64).astype(np.int64)
    runtimes = {}
    for on in (True, False):
        with every_constant(on):
            rt = load(args.bundle, mode="live", threads=2, backend="onnxruntime")
            adapters.register(rt.manifest)
            rt.generate([5, 6, 7], max_new_tokens=2)  # the decoder opens inside the context
        runtimes[on] = rt
    names = adapters.of("shira")[:2]
    for _ in range(args.blocks):
        for on, rt in runtimes.items():
            row = time_under_load(rt, target, names, prompt, reply_tokens=64,
                                  switches=args.switches, interval_ms=args.interval_ms,
                                  warmup=3)
            print(f"every constant {'on ' if on else 'off'}: switch p50 {row['p50_ms']:.2f}, "
                  f"p90 {row['p90_ms']:.2f}, p99 {row['p99_ms']:.2f} ms; held p99 "
                  f"{row['held_p99_ms']:.2f} ms; decode p50 {row['decode_p50_ms']:.1f} ms",
                  flush=True)


if __name__ == "__main__":
    main()
