"""Two probes of ONNX Runtime CPU's live-vs-base forward ratio (docs/bench.md, "Forward, ONNX
Runtime"), on a bundle from ``python -m edgeadapt.bench.prepare``:

    PYTHONPATH=. .venv/bin/python scripts/ort_forward_probe.py sessions BUNDLE 8x64 --k 3
    PYTHONPATH=. .venv/bin/python scripts/ort_forward_probe.py output BUNDLE 8x64

``sessions``: K base (repack: every weight packed) and K live sessions in one process, timed
interleaved; each session's median and live/base over every session pair, to tell a mode's
cost from one session's luck. ``output``: one live session returning its logits four ways
(the runtime's ``run``, the OrtValue's numpy view, a preallocated buffer, the OrtValue kept)
against the base, to price the output copy.
"""

from __future__ import annotations

import argparse

import numpy as np

from edgeadapt.bench.timing import time_interleaved
from edgeadapt.runtime import load


def _inputs(rt, shape: str) -> dict[str, np.ndarray]:
    """Random token ids, every other model input (attention mask) all ones."""
    b, s = (int(v) for v in shape.split("x"))
    ids = np.random.default_rng(0).integers(0, 1000, (b, s)).astype(np.int64)
    return {i["name"]: ids if i["name"] == "input_ids" else np.ones((b, s), np.int64)
            for i in rt.manifest.inputs}


def _load(bundle: str, mode: str):
    return load(bundle, backend="onnxruntime", mode=mode, threads=1, verify_base=False)


def sessions(bundle: str, shape: str, k: int, repeats: int) -> None:
    rts = {f"{m}{i}": _load(bundle, "repack" if m == "base" else "live")
           for i in range(k) for m in ("base", "live")}
    x = _inputs(rts["base0"], shape)
    samples = time_interleaved({n: (lambda r=r: r.run(**x)) for n, r in rts.items()},
                               repeats=repeats, warmup=3)
    med = {n: float(np.median(v)) for n, v in samples.items()}
    for n in sorted(med):
        print(f"{n} {med[n]:.3f} ms")
    bases = [med[f"base{i}"] for i in range(k)]
    lives = [med[f"live{i}"] for i in range(k)]
    print(f"live/base, median of session medians: {np.median(lives) / np.median(bases):.3f}")
    print("every pair:", sorted(round(lv / bv, 3) for lv in lives for bv in bases))


def output(bundle: str, shape: str, repeats: int) -> None:
    live, base = _load(bundle, "live"), _load(bundle, "repack")
    x = _inputs(live, shape)
    store = live.engine.store
    binding = store._binding()
    out_shape = live.run(**x).shape
    buf = np.empty(out_shape, np.float32)

    def bound(**out):
        for name, value in x.items():
            binding.bind_cpu_input(name, value)
        binding.bind_output(store.output_name, "cpu", **out)
        store.session.run_with_iobinding(binding)

    def view():
        bound()
        result = binding.get_outputs()[0].numpy()
        binding.clear_binding_outputs()
        return result

    def prealloc():
        bound(element_type=np.float32, shape=list(out_shape), buffer_ptr=buf.ctypes.data)
        return buf

    def copy():
        bound()
        result = binding.copy_outputs_to_cpu()[0]
        binding.clear_binding_outputs()
        return result

    cases = {"base": lambda: base.run(**x), "live (runtime run)": lambda: live.run(**x),
             "live, copy_outputs_to_cpu": copy, "live, OrtValue view": view,
             "live, preallocated output": prealloc}
    samples = time_interleaved(cases, repeats=repeats, warmup=2)
    ref = float(np.median(samples["base"]))
    for name, v in samples.items():
        print(f"{name}: {np.median(v):.2f} ms, {np.median(v) / ref:.3f} x base")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("probe", choices=["sessions", "output"])
    ap.add_argument("bundle")
    ap.add_argument("shape", help="BxS, e.g. 8x64")
    ap.add_argument("--k", type=int, default=3, help="sessions per mode (sessions probe)")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    if args.probe == "sessions":
        sessions(args.bundle, args.shape, args.k, args.repeats)
    else:
        output(args.bundle, args.shape, args.repeats)


if __name__ == "__main__":
    main()
