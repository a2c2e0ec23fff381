"""Real-model check of the ExecuTorch export: parity and forward latency, q/v-live vs constant.

    .venv/bin/python -m experiments.executorch_bench --model minilm --out OUT_DIR \
        --json minilm.json

(docs/export_executorch.md, "Real models".)

Exports ``--model`` with the ``--targets`` weights live (plus the all-constant program), checks
both against PyTorch (export-time verification), applies a random 1% sparse edit through the
live store and compares with PyTorch carrying the same edit (max relative error, argmax
agreement), then times forward at batch x seq 1x1, 1x64, 8x64, live and constant interleaved
(A B A B ...) so machine drift cancels; reports p50 per program and their ratio.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from edgeadapt.export.executorch import export_pte
from edgeadapt.models import LogitsModule, example_inputs, load_model, target_weight_names
from edgeadapt.numeric import rel_error
from edgeadapt.runtime.backends.executorch.store import ExecutorchStore
from edgeadapt.timer import stopwatch, time_interleaved

SHAPES = ((1, 1), (1, 64), (8, 64))


def _stores(out: Path, result: dict) -> tuple[ExecutorchStore, ExecutorchStore]:
    w = result["weights"]
    buffers = {k: v["buffer"] for k, v in w.items()}
    shapes = {k: tuple(v["shape"]) for k, v in w.items()}
    return (ExecutorchStore(out, result["section"], buffers, shapes, mode="live"),
            ExecutorchStore(out, result["section"], buffers, shapes, mode="repack"))


def sparse_edit_parity(lm, live: ExecutorchStore, density: float = 0.01, seed: int = 0
                       ) -> dict[str, float]:
    """Write W[idx] += v (1% random positions) into the live store and the torch model."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for w, lw in live.live_weights().items():
            W = lm.model.get_parameter(w)
            n = W.numel()
            idx = np.sort(rng.choice(n, size=int(density * n), replace=False))
            vals = (rng.standard_normal(idx.size) * float(W.std()) * 3).astype(np.float32)
            W.view(-1)[torch.from_numpy(idx)] += torch.from_numpy(vals)
            lw.torch_view().reshape(-1)[idx] += vals
    inp = {k: v.numpy() for k, v in example_inputs(lm, 8, 64, seed=5).items()}
    with torch.no_grad():
        ref = LogitsModule(lm)(**{k: torch.from_numpy(v) for k, v in inp.items()}).numpy()
    got = live.run(inp)
    return {"rel_err": rel_error(got, ref),
            "argmax_agreement": float((got.argmax(-1) == ref.argmax(-1)).mean())}


def interleaved_latency(lm, live: ExecutorchStore, const: ExecutorchStore, repeats: int
                        ) -> list[dict]:
    rows = []
    for b, s in SHAPES:
        inp = {k: v.numpy() for k, v in example_inputs(lm, b, s, seed=1).items()}
        t = time_interleaved({"live": lambda x=inp: live.run(x),
                              "const": lambda x=inp: const.run(x)}, repeats=repeats, warmup=3)
        t_live, t_const = t["live"], t["const"]
        p_live, p_const = float(np.median(t_live)), float(np.median(t_const))
        rows.append({"batch": b, "seq": s, "live_p50_ms": p_live, "const_p50_ms": p_const,
                     "ratio": p_live / p_const})
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--targets", default="qv")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    live_names = target_weight_names(lm.model, args.targets)
    elapsed = stopwatch()
    result = export_pte(lm, args.out, live_names)
    export_s = elapsed()
    live, const = _stores(args.out, result)
    report = {
        "model": args.model, "targets": args.targets, "live_weights": len(live_names),
        "export_s": export_s, "verify_max_rel_err": result["verify"],
        "latency": interleaved_latency(lm, live, const, args.repeats),
        "sparse_edit_1pct": sparse_edit_parity(lm, live),
        "threads": args.threads,
    }
    elapsed = stopwatch()
    const.commit({w: None for w in const.live_weights()})
    report["repack_reload_ms"] = elapsed() * 1e3
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
