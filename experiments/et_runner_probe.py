"""One ExecuTorch program on ExecuTorch's Python runtime (the pybindings, as the bench runs the
stock programs) and on edgeadapt's native runner (as the bundles run), in the same rounds::

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python -m experiments.et_runner_probe \\
        bundles/quant-smollm2/executorch-int4-stock.pte [--threads 2] [--rounds 15]

Per shape (1 x 1, 1 x 64, 8 x 64 tokens of SmolLM2's forward) each round times ``calls`` runs
on one, then on the other; prints the medians and the median of the per-round ratios runner /
pybindings. The outputs are checked equal first. What it measured is in docs/quantized.md
("ExecuTorch run 3").
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

SHAPES = ((1, 1, 20), (1, 64, 5), (8, 64, 5))  # batch, tokens, calls per round


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pte", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()

    from edgeadapt.bench.quantized_executorch import executorch_forward
    from edgeadapt.runtime.backends.executorch.native_runner import RunnerProgram
    from edgeadapt.runtime.backends.executorch.store import use_threads

    use_threads(args.threads)
    pybindings = executorch_forward(args.pte)
    runner = RunnerProgram(args.pte).method("forward")
    rng = np.random.default_rng(0)
    for b, s, calls in SHAPES:
        ids = rng.integers(5, 40000, (b, s)).astype(np.int64)
        if not np.array_equal(pybindings(ids), runner.execute([ids])[0]):
            raise SystemExit(f"{b}x{s}: the two runtimes' outputs differ")
        times: dict[str, list[float]] = {"pybindings": [], "runner": []}
        for _ in range(args.rounds):
            for name, run in (("pybindings", pybindings),
                              ("runner", lambda i: runner.execute([i]))):
                t0 = time.perf_counter()
                for _ in range(calls):
                    run(ids)
                times[name].append((time.perf_counter() - t0) / calls)
        ratio = np.array(times["runner"]) / np.array(times["pybindings"])
        print(f"{b}x{s}: pybindings {1e3 * np.median(times['pybindings']):.2f} ms, runner "
              f"{1e3 * np.median(times['runner']):.2f} ms, runner / pybindings "
              f"{np.median(ratio):.3f} (p10 {np.percentile(ratio, 10):.3f}, "
              f"p90 {np.percentile(ratio, 90):.3f})")


if __name__ == "__main__":
    main()
