"""Switch costs of the engine on ONNX Runtime, torch-free (numbers for docs/runtime.md).

    python -m edgeadapt.runtime.measure [--layers 8] [--dim 1024] [--density 0.01] [--rank 16]

Builds a toy bundle (edgeadapt.runtime.toy) whose ``layers`` square weights are all live,
then times full switches (undo the previous adapter, apply the next) with the median of
``--repeats`` runs: SHiRA A -> B (live), LoRA A -> B with exact restore (live), SHiRA A -> B in
repack mode (includes the session rebuild), and re-creating the session.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from edgeadapt.format import Adapter, LoraDelta, ShiraDelta, weight_sha256, write_adapter


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def main(argv: list[str] | None = None) -> dict:
    from edgeadapt.runtime import load
    from edgeadapt.runtime.onnxruntime_backend import OrtLiveStore
    from edgeadapt.runtime.toy import toy_weights, write_toy_bundle

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    w0 = toy_weights([args.dim] * (args.layers + 1))
    names = sorted(w0)
    sha = {n: weight_sha256(w) for n, w in w0.items()}
    shapes = {n: w.shape for n, w in w0.items()}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        entries = {}
        for i in range(2):
            k = int(args.density * args.dim * args.dim)
            sh = {n: ShiraDelta(np.sort(rng.choice(args.dim * args.dim, k, replace=False)),
                                rng.standard_normal(k).astype(np.float32) * 0.01) for n in names}
            lo = {n: LoraDelta(rng.standard_normal((args.rank, args.dim)).astype(np.float32) * .01,
                               rng.standard_normal((args.dim, args.rank)).astype(np.float32) * .01)
                  for n in names}
            for kind, t in (("shira", sh), ("lora", lo)):
                write_adapter(out / f"{kind}{i}.eadp", Adapter(kind, t, shapes, sha))
                entries[f"{kind}{i}"] = (f"{kind}{i}.eadp", kind)
        write_toy_bundle(out, w0, names, entries)
        live_mib = sum(w.nbytes for w in w0.values()) / 2**20
        res: dict = {"layers": args.layers, "dim": args.dim, "live_mib": live_mib,
                     "density": args.density, "rank": args.rank}
        for mode in ("live", "repack"):
            rt = load(out, mode=mode, threads=1)
            for kind in (("shira", "lora") if mode == "live" else ("shira",)):
                for n in (f"{kind}0", f"{kind}1"):
                    rt.prepare(n)
                state = [0]

                def flip(rt=rt, kind=kind, state=state):
                    state[0] ^= 1
                    rt.switch(f"{kind}{state[0]}")

                flip()
                res[f"{kind}_{mode}_switch_ms"] = _median_ms(flip, args.repeats)
                res[f"{kind}_{mode}_restore_bytes"] = rt.restore_memory_bytes()
        m = rt.manifest
        names_map = {n: m.weights[n].onnx["name"] for n in m.weights}

        def recreate():
            from edgeadapt.runtime.onnxruntime_backend import read_live_weights
            OrtLiveStore(out / m.onnx["file"], read_live_weights(out, m), m.inputs, names_map, 1)

        res["recreate_session_ms"] = _median_ms(recreate, max(3, args.repeats // 4))
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
