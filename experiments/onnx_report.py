"""Real-model ONNX export run: parity of the exported base with PyTorch, and the forward cost of
live q/v weights versus an all-constant graph (docs/export_onnx.md, "Real models").

    .venv/bin/python -m experiments.onnx_report --models minilm,smollm2 --out OUT_DIR \
        --latency smollm2 --repeats 40 --json onnx_report.json   [--reuse: skip the export]

The all-constant graph is the exported q/v-live graph with the live inputs put back as constant
initializers (blocked32 readers turned back into plain MatMuls, so every weight is packable), so
the ratio isolates the cost of live weights.
Timings alternate A B A B ... (order flipped every round) on one thread, so drift cancels.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from safetensors.numpy import load_file

from edgeadapt import timer
from edgeadapt.errors import ParityError
from edgeadapt.export.onnx_check import BoundSession, session
from edgeadapt.graphs import blocked as ob
from edgeadapt.numeric import rel_error
from edgeadapt.timer import stopwatch

CASES = ((1, 1), (1, 64), (8, 64))


def constant_copy(model_path: Path, live_file: Path) -> bytes:
    """The graph at ``model_path`` with its live inputs turned back into constant initializers
    holding their base values (serialised; weights inline, fine below 2 GiB). blocked32 inputs
    first go back to 2-D ``(in, out)`` MatMul weights, the only ones ONNX Runtime prepacks."""
    from edgeadapt.runtime.backends.onnxruntime.session import constant_values

    proto = onnx.load(str(model_path))
    values = load_file(str(live_file))
    values = constant_values(values, ob.unblock_live_matmuls(proto, set(values)))
    kept = [i for i in proto.graph.input if i.name not in values]
    del proto.graph.input[:]
    proto.graph.input.extend(kept)
    proto.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in values.items())
    return proto.SerializeToString()


def time_interleaved(runs: dict[str, callable], repeats: int, warmup: int = 3) -> dict:
    """p50 / p90 (ms) per named zero-argument callable, timed in rotating order."""
    times = timer.time_interleaved(runs, repeats=repeats, warmup=warmup)
    return {n: {"p50_ms": float(np.percentile(t, 50)), "p90_ms": float(np.percentile(t, 90))}
            for n, t in times.items()}


def live_vs_constant(out: Path, section: dict, vocab: int, repeats: int, threads: int) -> list:
    """Forward latency of the live graph (inputs bound once) vs its all-constant copy."""
    live_values = load_file(str(out / section["live_weights_file"]))
    live = BoundSession(session(out / section["file"], threads), live_values)
    const_bytes = constant_copy(out / section["file"], out / section["live_weights_file"])
    const = BoundSession(session_from_bytes(const_bytes, threads), {})
    rng = np.random.default_rng(0)
    rows = []
    for batch, seq in CASES:
        feeds = {"input_ids": rng.integers(5, vocab, (batch, seq), dtype=np.int64)}
        if any(i["name"] == "attention_mask" for i in section["inputs"]):
            feeds["attention_mask"] = np.ones((batch, seq), np.int64)
        err = rel_error(live.run(feeds), const.run(feeds))
        if not err <= 1e-4:
            raise ParityError(f"live and constant graphs disagree ({err:.3g}) at {batch}x{seq}")
        t = time_interleaved({"live": lambda f=feeds: live.run(f),
                              "constant": lambda f=feeds: const.run(f)}, repeats)
        rows.append({"batch": batch, "seq": seq, **{f"{k}_{m}": v[m] for k, v in t.items()
                                                     for m in ("p50_ms", "p90_ms")},
                     "ratio_p50": t["live"]["p50_ms"] / t["constant"]["p50_ms"]})
    return rows


def session_from_bytes(data: bytes, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="minilm,smollm2")
    ap.add_argument("--targets", default="qv")
    ap.add_argument("--out", required=True, help="directory for the exported models")
    ap.add_argument("--latency", default="smollm2", help="models to time (comma list or '')")
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--reuse", action="store_true",
                    help="reuse an export already in --out (its export.json) instead of exporting")
    args = ap.parse_args(argv)

    import torch

    from edgeadapt.export.onnx import export_onnx
    from edgeadapt.models import load_model, target_weight_names

    torch.set_num_threads(args.threads)
    report = {"onnxruntime": __import__("onnxruntime").__version__, "torch": torch.__version__,
              "threads": args.threads, "models": {}}
    for name in [m for m in args.models.split(",") if m]:
        lm = load_model(name)
        out = Path(args.out) / f"{name}-{args.targets}"
        live = target_weight_names(lm.model, args.targets)
        elapsed = stopwatch()
        saved = out / "export.json"
        if args.reuse and saved.is_file():
            res = json.loads(saved.read_text())
        else:
            res = export_onnx(lm, out, live, threads=args.threads)
            saved.write_text(json.dumps(res, indent=1))
        sec = res["section"]
        entry = {"export_s": elapsed(), "live_weights": len(live),
                 "live_params": int(sum(np.prod(w["shape"]) for w in res["weights"].values())),
                 "params": int(sum(p.numel() for p in lm.model.parameters())),
                 "layouts": sorted({w["layout"] for w in res["weights"].values()}),
                 "parity": sec["parity"], "opset": sec["opset"], "ir_version": sec["ir_version"]}
        if name in args.latency.split(","):
            entry["latency"] = live_vs_constant(out, sec, lm.vocab_size, args.repeats,
                                                args.threads)
        report["models"][name] = entry
        print(json.dumps({name: entry}, indent=1), flush=True)
        del lm, res
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
