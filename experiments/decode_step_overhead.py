"""What a decode step costs around ONNX Runtime's run: a greedy ``rt.stream`` of ``--steps``
tokens after a ``--context``-token prompt, each step split into the session's
``run_with_iobinding`` (the graph), the rest of ``OrtDecoder.step`` (binding its inputs and
outputs) and the rest of the stream step (sampling, detokenising, the lock); medians over the
steps, ``--repeats`` streams one after the other.

    .venv/bin/python -m experiments.decode_step_overhead BUNDLE [--context 128] [--steps 100]
        [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    from edgeadapt.bench.generation.decoding import ignore_end_of_turn
    from edgeadapt.runtime import load
    from edgeadapt.runtime.backends.onnxruntime import decoder as ort_decoder

    rt = load(args.bundle, threads=args.threads)
    ignore_end_of_turn(rt)
    runs: list[float] = []
    steps: list[float] = []
    plain_step = ort_decoder.OrtDecoder.step

    def step(self, *a, **k):
        session = self.session
        if not getattr(session, "_timed", False):
            plain_run = session.run_with_iobinding

            def run(*ra):
                t = time.perf_counter()
                try:
                    return plain_run(*ra)
                finally:
                    runs.append(time.perf_counter() - t)

            session.run_with_iobinding, session._timed = run, True
        t = time.perf_counter()
        try:
            return plain_step(self, *a, **k)
        finally:
            steps.append(time.perf_counter() - t)

    ort_decoder.OrtDecoder.step = step
    prompt = np.random.default_rng(0).integers(100, 40000, args.context).astype(np.int64)
    for _ in range(args.repeats):
        pieces = iter(rt.stream(prompt, max_new_tokens=args.steps + 1))
        next(pieces)  # the prefill
        whole = []
        for _ in range(args.steps):
            t = time.perf_counter()
            next(pieces)
            whole.append(time.perf_counter() - t)
        w, s, r = (np.array(x[-args.steps:]) * 1e3 for x in (whole, steps, runs))
        print(f"step {np.median(w):.3f} ms: run {np.median(r):.3f}, binding "
              f"{np.median(s - r):.3f}, stream {np.median(w - s):.3f}")


if __name__ == "__main__":
    main()
