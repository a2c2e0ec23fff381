"""A decode step's session run alone, edgeadapt's decoder beside onnxruntime-genai's graph, paired
and without ONNX Runtime's profiler (which puts the two graphs' nodes level: experiments/
decode_profile.py): each takes the same one-token step after a ``--past``-token prefill again
and again (its cache rewound), both from Python through an IOBinding with the same session
options (``--threads`` intra-op threads, spinning off), in interleaved rounds; genai's own
generator (its C++ loop, a real decode step each call) is timed beside them.

    .venv/bin/python -m experiments.decode_graph_pair BUNDLE GENAI_MODEL_DIR [--past 128]
        [--rounds 100] [--threads 2] [--repack]

``--repack`` adds edgeadapt's decoder in repack mode (the live weights prepacked constants read
by ONNX Runtime's MatMul, as genai's are): what reading them live costs the step.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def ours(bundle: Path, past: int, threads: int, ids: np.ndarray, mode: str = "live"):
    """edgeadapt's decoder step at position ``past``, again and again (``mode``: the runtime's:
    ``live`` reads the live weights in place, ``repack`` makes them prepacked constants)."""
    from edgeadapt.runtime import get_backend, load
    from edgeadapt.runtime.generate import open_generator

    rt = load(bundle, mode=mode, threads=threads)
    gen = open_generator(rt.bundle_dir, rt.manifest, get_backend("onnxruntime"), rt.store,
                         device="cpu", threads=threads)
    cache = gen.decoder.empty_cache(1)
    gen.decoder.step(ids[:, :past], cache, keep=1)
    one = np.ascontiguousarray(ids[:, past:past + 1])

    def step() -> None:
        cache.length = past  # the same position again: the same keys written
        gen.decoder.step(one, cache, keep=1)

    step.keep = (rt, gen)  # the runtime lives as long as the step
    return step


def genai_graph(model_dir: Path, past: int, threads: int, ids: np.ndarray):
    """genai's ``model.onnx`` fed as genai feeds it (its cache buffers bound as past and
    present), one step at position ``past`` again and again."""
    import onnxruntime as ort

    from experiments.decode_profile import genai_feed, genai_options

    sess = ort.InferenceSession(str(model_dir / "model.onnx"), genai_options(threads),
                                providers=["CPUExecutionProvider"])
    run = genai_feed(sess, model_dir, past + 1)
    run(ids[:, :past], past)
    one = np.ascontiguousarray(ids[:, past:past + 1])
    return lambda: run(one, past + 1)


def genai_generator(model_dir: Path, past: int, rounds: int, ids: np.ndarray):
    """genai's own loop: each call one ``generate_next_token`` (a decode step)."""
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))
    params = og.GeneratorParams(model)
    length = past + rounds + 20
    params.set_search_options(max_length=length, min_length=length, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids[:, :past].astype(np.int32))
    gen.generate_next_token()
    step = gen.generate_next_token
    return step


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("genai_dir", type=Path)
    ap.add_argument("--past", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repack", action="store_true")
    args = ap.parse_args(argv)
    ids = np.random.default_rng(0).integers(100, 40000, (1, args.past + 1)).astype(np.int64)
    cases = {"edgeadapt": ours(args.bundle, args.past, args.threads, ids),
             "genai graph": genai_graph(args.genai_dir, args.past, args.threads, ids),
             "genai generator": genai_generator(args.genai_dir, args.past, args.rounds, ids)}
    if args.repack:
        cases["edgeadapt repack"] = ours(args.bundle, args.past, args.threads, ids, "repack")
    report_paired(cases, args.rounds, warmup=5)


def report_paired(cases: dict, rounds: int, warmup: int, title: str = "") -> None:
    """Time ``cases`` interleaved (:func:`edgeadapt.timer.time_interleaved`) and print each
    one's median and the median (p10, p90) of its per-round ratio to the first case."""
    from edgeadapt.timer import time_interleaved

    t = {k: np.array(v) for k, v in time_interleaved(cases, repeats=rounds,
                                                       warmup=warmup).items()}
    first = next(iter(t))
    for name, v in t.items():
        r = v / t[first]
        print(f"{title}{name:20s} p50 {np.median(v):8.3f} ms; / {first} paired median "
              f"{np.median(r):.3f} (p10 {np.percentile(r, 10):.3f}, p90 "
              f"{np.percentile(r, 90):.3f})")


if __name__ == "__main__":
    main()
