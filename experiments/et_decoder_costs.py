"""What the ExecuTorch decoder costs (docs/generate.md, "ExecuTorch"): on a bundle exported with
``--backends executorch --generate``,

- the switch with and without the decoder: two runtimes of the bundle in one process, one of
  them with a conversation open (its ``decode`` method loaded and stepped), switching between
  two adapters (the plan cached), timed interleaved;
- a decode step at several contexts (a step from a cache of ``L`` positions, repeated from the
  same cache), and a prefill chunk (128 tokens, or the decoder's ``max_chunk`` if fewer);
- moving a conversation's cache in and out of the program against re-prefilling it: two
  conversations of ``L`` positions stepping in turn (every step moves one cache out and the
  other in) against one conversation stepping alone; the difference is the move, compared
  with a prefill of ``L`` tokens in such chunks (what re-prefilling the other conversation
  would cost instead).

``--adapters`` names two adapters of the bundle; without them two SHiRA adapters of 1% of
every live weight (random positions and values) are registered in the bundle
(``lab-a``, ``lab-b``). Timings: :mod:`edgeadapt.timer`, milliseconds, median.

    .venv/bin/python -m experiments.et_decoder_costs BUNDLE [--contexts 128,1024] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

from edgeadapt.format import read_manifest
from edgeadapt.runtime import load
from edgeadapt.timer import time_calls, time_interleaved


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def _synthetic_adapters(bundle: Path) -> list[str]:
    """Register two random SHiRA adapters (1% of each live weight) in the bundle; their names."""
    from edgeadapt.format import AdapterEntry, write_adapter, write_manifest
    from edgeadapt.format.types import Adapter, ShiraDelta

    manifest = read_manifest(bundle)
    rng = np.random.default_rng(0)
    (bundle / "adapters").mkdir(exist_ok=True)
    names = []
    for name in ("lab-a", "lab-b"):
        deltas, shapes, sha = {}, {}, {}
        for w, entry in manifest.weights.items():
            size = int(np.prod(entry.shape))
            idx = np.sort(rng.choice(size, max(1, size // 100), replace=False)).astype(np.int64)
            deltas[w] = ShiraDelta(idx, (0.01 * rng.standard_normal(idx.size)).astype(np.float32))
            shapes[w], sha[w] = tuple(entry.shape), entry.sha256
        write_adapter(bundle / "adapters" / f"{name}.eadp", Adapter("shira", deltas, shapes, sha),
                      value_dtype="float32")
        manifest.adapters[name] = AdapterEntry(file=f"adapters/{name}.eadp", method="shira")
        names.append(name)
    write_manifest(bundle, manifest)
    return names


def _steps(decoder, caches: list, repeats: int) -> tuple[float, float]:
    """Median ms of a one-token step from ``caches[0]`` repeated (no move), and of steps
    alternating between the two caches (each moves the other's out and its own in); timed
    apart, not interleaved, since a step alone must follow a step of the same cache."""
    one = np.array([[5]], dtype=np.int64)
    turn = {"k": 0}

    def in_turn() -> None:
        decoder.step(one, caches[turn["k"] % 2])
        turn["k"] += 1

    alone = _median(time_calls(lambda: decoder.step(one, caches[0]), repeats=repeats, warmup=3))
    return alone, _median(time_calls(in_turn, repeats=repeats, warmup=3))


def measure(bundle: Path, adapters: list[str], contexts: list[int], threads: int,
            repeats: int) -> dict:
    plain = load(bundle, backend="executorch", mode="live", threads=threads)
    generating = load(bundle, backend="executorch", mode="live", threads=threads)
    decoder = generating.conversation()._gen.decoder
    out: dict = {"bundle": str(bundle), "threads": threads, "contexts": contexts}
    rng = np.random.default_rng(1)
    vocab = read_manifest(bundle).extra["generate"]["vocab_size"]
    decoder.step(np.array([[5]], dtype=np.int64), decoder.empty_cache(1))

    def switcher(rt):
        """Switch ``rt`` to the other adapter at each call."""
        flips = {"n": 0}

        def switch() -> None:
            rt.switch(adapters[flips["n"] % 2])
            flips["n"] += 1
        return switch

    for rt in (plain, generating):  # plan both directions once
        for name in adapters * 2:
            rt.switch(name)
    times = time_interleaved({"switch": switcher(plain), "switch_with_decoder":
                              switcher(generating)}, repeats=repeats)
    out["switch_ms"] = {k: _median(v) for k, v in times.items()}

    def prefill(n: int):
        ids = rng.integers(5, vocab, n).astype(np.int64)

        def run():
            cache = decoder.empty_cache(1)
            for start in range(0, n, decoder.max_chunk):
                _, cache = decoder.step(ids[None, start:start + decoder.max_chunk], cache)
            return cache
        return run

    out["prefill_chunk"] = decoder.max_chunk
    out["prefill_chunk_ms"] = _median(time_calls(prefill(decoder.max_chunk), repeats=repeats,
                                                 warmup=1))
    out["decode_ms"], out["move_ms"], out["reprefill_ms"] = {}, {}, {}
    for L in contexts:
        alone, in_turn = _steps(decoder, [prefill(L)(), prefill(L)()], repeats)
        out["decode_ms"][L] = alone
        out["move_ms"][L] = in_turn - alone
        out["reprefill_ms"][L] = _median(time_calls(prefill(L), repeats=max(3, repeats // 10)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--adapters", default=None, help="two adapter names, A,B")
    parser.add_argument("--contexts", default="32,90", help="decode contexts, e.g. 128,1024")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args(argv)
    adapters = args.adapters.split(",") if args.adapters else _synthetic_adapters(args.bundle)
    result = measure(args.bundle, adapters, [int(c) for c in args.contexts.split(",")],
                     args.threads, args.repeats)
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
