"""Where a decode step's time goes, edgeadapt's ONNX Runtime decoder beside onnxruntime-genai's
graph (docs/bench.md, "Generation", the base-decode miss): ONNX Runtime's own profiler on
``--steps`` single-token steps after a ``--past``-token prefill, both sessions with the same
options (``--threads`` intra-op threads, spinning off), run one after the other in one process.

Per graph: the median run, the time inside nodes and the time per op type (summed over the
nodes of a step) with the node count. genai's graph is run as genai runs it (its cache buffers
bound as both past and present, the attention mask as long as the context).

    .venv/bin/python -m experiments.decode_profile BUNDLE GENAI_MODEL_DIR [--past 100]
        [--steps 30] [--threads 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import numpy as np


def genai_options(threads: int, prefix: str | None = None):
    """genai's session options: ``threads`` intra-op threads, spinning off; profiling into
    ``prefix`` where given."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = prefix
    return so


def _summary(profile: str, steps: int) -> dict:
    """Median run and per-op totals over the last ``steps`` runs of a profile file."""
    events = json.loads(Path(profile).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    runs = runs[-steps:]
    start = runs[0]["ts"]
    times, counts = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["ts"] >= start and e["name"].endswith("_kernel_time"):
            op = e["args"].get("op_name")
            times[op] += e["dur"]
            counts[op] += 1
    per_step = {op: {"ms": t / steps / 1000, "nodes": counts[op] / steps}
                for op, t in times.most_common()}
    return {"run_ms": float(np.median([e["dur"] for e in runs])) / 1000,
            "nodes_ms": sum(times.values()) / steps / 1000,
            "nodes_per_step": sum(counts.values()) / steps, "ops": per_step}


def ours(bundle: Path, past: int, steps: int, threads: int, prefix: str) -> dict:
    """edgeadapt's decoder of ``bundle`` (live weights, the runtime's own session options with
    profiling on)."""
    import edgeadapt.runtime.backends.onnxruntime.decoder as dec
    from edgeadapt.runtime import get_backend, load
    from edgeadapt.runtime.generate import open_generator

    plain = dec.session_options
    dec.session_options = lambda t, extra=None: _with_profile(plain(t, extra), prefix)
    try:
        rt = load(bundle, mode="live", threads=threads)
        gen = open_generator(rt.bundle_dir, rt.manifest, get_backend("onnxruntime"), rt.store,
                             device="cpu", threads=threads)
    finally:
        dec.session_options = plain
    ids = np.random.default_rng(0).integers(100, 40000, size=(1, past + steps)).astype(np.int64)
    cache = gen.decoder.empty_cache(1)
    _, cache = gen.decoder.step(ids[:, :past], cache, keep=1)
    for i in range(past, past + steps):
        _, cache = gen.decoder.step(ids[:, i:i + 1], cache, keep=1)
    return _summary(gen.decoder.session.end_profiling(), steps)


def _with_profile(so, prefix: str):
    so.enable_profiling = True
    so.profile_file_prefix = prefix
    return so


def genai_feed(sess, model_dir: Path, capacity: int):
    """``run(ids, length)`` of genai's graph in session ``sess`` as genai feeds it: its cache
    buffers of ``capacity`` positions bound as both past and present (once), ``ids`` after
    ``length - seq`` cached positions with an attention mask of ``length``, the logits
    allocated by ONNX Runtime."""
    import onnxruntime as ort

    head_size = json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"][
        "head_size"]  # the graph leaves it symbolic
    pasts = [i for i in sess.get_inputs() if i.name.startswith("past_key_values")]
    b = sess.io_binding()
    for i in pasts:
        value = ort.OrtValue.ortvalue_from_numpy(
            np.zeros((1, i.shape[1], capacity, head_size), np.float32))
        b.bind_ortvalue_input(i.name, value)
        b.bind_ortvalue_output(i.name.replace("past_key_values", "present"), value)

    def run(ids: np.ndarray, length: int) -> None:
        b.bind_cpu_input("input_ids", ids)
        b.bind_cpu_input("attention_mask", np.ones((1, length), np.int64))
        b.bind_output("logits", "cpu")  # its shape changes with the tokens fed
        sess.run_with_iobinding(b)

    return run


def genai(model_dir: Path, past: int, steps: int, threads: int, prefix: str) -> dict:
    """onnxruntime-genai's ``model.onnx`` in ``model_dir``, fed as genai feeds it."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_dir / "model.onnx"), genai_options(threads, prefix),
                                providers=["CPUExecutionProvider"])
    step = genai_feed(sess, model_dir, past + steps + 1)

    ids = np.random.default_rng(0).integers(100, 40000, size=(1, past + steps)).astype(np.int64)
    step(ids[:, :past], past)
    for i in range(past, past + steps):
        step(ids[:, i:i + 1], i + 1)
    return _summary(sess.end_profiling(), steps)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("genai_dir", type=Path)
    ap.add_argument("--past", type=int, default=100)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        report = {"past": args.past, "steps": args.steps, "threads": args.threads,
                  "edgeadapt": ours(args.bundle, args.past, args.steps, args.threads,
                                    f"{tmp}/ours"),
                  "onnxruntime-genai": genai(args.genai_dir, args.past, args.steps,
                                             args.threads, f"{tmp}/genai")}
    for name in ("edgeadapt", "onnxruntime-genai"):
        r = report[name]
        print(f"{name}: run {r['run_ms']:.2f} ms, in nodes {r['nodes_ms']:.2f} ms, "
              f"{r['nodes_per_step']:.0f} nodes a step")
        for op, v in list(r["ops"].items())[:6]:
            print(f"  {op:36s} {v['ms']:6.2f} ms  {v['nodes']:4.0f} nodes")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
