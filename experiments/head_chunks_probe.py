"""The float LM head in chunks (edgeadapt/graphs/head.py: a terminated step stops within one
chunk) against the same head whole, on a decode step of an ONNX Runtime ``--generate`` bundle.

A copy of the bundle (files copied: ONNX Runtime refuses linked external data) gets a
``decoder.onnx`` whose chunk ``Slice`` / ``MatMul`` nodes and their ``Concat`` are one
``MatMul`` over the head's own weight; both decoders take the same one-token step after a
``--past``-token prefill, in interleaved rounds (:func:`edgeadapt.timer.time_interleaved`); the
logits must be equal (every column is its own dot product). Prints each p50 and the paired
median of whole / chunks.

    .venv/bin/python -m experiments.head_chunks_probe bundles/smollm2-generate [--past 128]
        [--rounds 60] [--threads 2]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np


def whole_head(bundle: Path, out: Path) -> int:
    """Copy ``bundle`` to ``out`` with the decoder's float head chunks made one MatMul; returns
    the number of chunks replaced (ValueError where the head is not chunked)."""
    import onnx
    from onnx import helper

    shutil.copytree(bundle, out)
    path = out / "decoder.onnx"
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    concat = [n for n in graph.node if n.op_type == "Concat" and n.name.endswith("/keep/concat")]
    if len(concat) != 1:
        raise ValueError(f"{bundle}: the decoder's head is not in chunks")
    producer = {o: n for n in graph.node for o in n.output}
    matmuls = [producer[i] for i in concat[0].input]
    slices = [producer[m.input[1]] for m in matmuls]
    if {m.op_type for m in matmuls} != {"MatMul"} or {s.op_type for s in slices} != {"Slice"}:
        raise ValueError(f"{bundle}: the head's chunks are not float MatMuls of Slices")
    gone = {id(n) for n in [*concat, *matmuls, *slices]}
    body = [n for n in graph.node if id(n) not in gone]
    body.append(helper.make_node("MatMul", [matmuls[0].input[0], slices[0].input[0]],
                                 list(concat[0].output), name="head/whole"))
    del graph.node[:]
    graph.node.extend(body)
    onnx.save(model, str(path))
    return len(matmuls)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--past", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    from edgeadapt.runtime import get_backend, load
    from edgeadapt.runtime.generate import open_generator
    from edgeadapt.timer import time_interleaved

    with tempfile.TemporaryDirectory() as tmp:
        chunks = whole_head(args.bundle, Path(tmp) / "whole")
        ids = np.random.default_rng(0).integers(100, 40000, (1, args.past + 1)).astype(np.int64)
        steps, keep = {}, []
        for name, bundle in (("chunks", args.bundle), ("whole", Path(tmp) / "whole")):
            rt = load(bundle, mode="live", threads=args.threads)
            gen = open_generator(rt.bundle_dir, rt.manifest, get_backend("onnxruntime"),
                                 rt.store, device="cpu", threads=args.threads)
            cache = gen.decoder.empty_cache(1)
            gen.decoder.step(ids[:, :args.past], cache, keep=1)

            def step(dec=gen.decoder, cache=cache) -> np.ndarray:
                cache.length = args.past  # the same position again: the same keys written
                return dec.step(ids[:, args.past:], cache, keep=1)[0]

            steps[name] = step
            keep.append((rt, gen))
        a, b = steps["chunks"]().copy(), steps["whole"]().copy()
        if not np.array_equal(a, b):
            raise SystemExit(f"logits differ: {np.abs(a - b).max()}")
        t = time_interleaved(steps, repeats=args.rounds, warmup=3)
    c, w = np.array(t["chunks"]), np.array(t["whole"])
    print(f"head in {chunks} chunks: p50 {np.median(c):.3f} ms; whole: p50 {np.median(w):.3f} ms;"
          f" whole / chunks paired median {np.median(w / c):.3f} (p10 "
          f"{np.percentile(w / c, 10):.3f}, p90 {np.percentile(w / c, 90):.3f})")


if __name__ == "__main__":
    main()
