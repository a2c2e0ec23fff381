"""edgeadapt's kernel reading every constant weight of a graph, not only those beside a live one
(``every_constant`` of :func:`edgeadapt.graphs.blocked.kernel_blocked_matmuls` and
:func:`edgeadapt.graphs.quantized.kernel_quantized_matmuls`), against the same runtime with
the constants left to ONNX Runtime's MatMul / MatMulNBits (MLAS, prepacked), paired:

- ``decode``: a one-token decoder step after ``--past`` positions (the runtime's decoder uses
  ``every_constant``), with onnxruntime-genai's graph run the same way where ``--genai`` names
  its model folder (:mod:`experiments.decode_graph_pair`);
- ``forward``: the bundle's forward graph at ``--shapes`` (the forward store's default reads
  every int4 constant with the kernel and the float ones only beside a live weight), live
  both ways.

    .venv/bin/python -m experiments.constant_kernel_probe BUNDLE [--what decode,forward]
        [--genai DIR] [--threads 2] [--past 128] [--shapes 1x1,1x64,8x64] [--rounds 100]
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import numpy as np


@contextlib.contextmanager
def every_constant(on: bool):
    """Sessions built inside take ``every_constant=on`` whatever their caller asks."""
    from edgeadapt.runtime.backends.onnxruntime import decoder, session, store

    plain = session.live_session

    def forced(*args, **kwargs):
        kwargs["every_constant"] = on
        return plain(*args, **kwargs)

    modules = (decoder, store)
    for m in modules:
        m.live_session = forced
    try:
        yield
    finally:
        for m in modules:
            m.live_session = plain


def decode_cases(bundle: Path, genai: Path | None, past: int, threads: int) -> dict:
    from experiments.decode_graph_pair import genai_graph, ours

    ids = np.random.default_rng(0).integers(100, 40000, (1, past + 1)).astype(np.int64)
    cases = {}
    for on in (True, False):
        with every_constant(on):
            cases[f"every constant {'on' if on else 'off'}"] = ours(bundle, past, threads, ids)
    if genai is not None:
        cases["genai graph"] = genai_graph(genai, past, threads, ids)
    return cases


def forward_cases(bundle: Path, shape: tuple[int, int], threads: int) -> dict:
    from edgeadapt.runtime import load

    ids = np.random.default_rng(0).integers(100, 30000, shape).astype(np.int64)
    cases = {}
    for on in (True, False):
        with every_constant(on):
            rt = load(bundle, mode="live", threads=threads, backend="onnxruntime")
        cases[f"every constant {'on' if on else 'off'}"] = lambda rt=rt: rt.run(input_ids=ids)
    return cases


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--what", default="decode,forward")
    ap.add_argument("--genai", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--past", type=int, default=128)
    ap.add_argument("--shapes", default="1x1,1x64,8x64")
    ap.add_argument("--rounds", type=int, default=100)
    args = ap.parse_args(argv)
    from experiments.decode_graph_pair import report_paired

    what = args.what.split(",")
    if "decode" in what:
        report_paired(decode_cases(args.bundle, args.genai, args.past, args.threads),
                      args.rounds, warmup=3, title="decode ")
    if "forward" in what:
        for s in args.shapes.split(","):
            b, t = (int(v) for v in s.split("x"))
            rounds = args.rounds if b * t < 100 else max(5, args.rounds // 10)
            report_paired(forward_cases(args.bundle, (b, t), args.threads), rounds, warmup=3,
                          title=f"forward {s} ")


if __name__ == "__main__":
    main()
