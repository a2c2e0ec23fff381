"""Time of edgeadapt's ExecuTorch quantized live linears against XNNPACK's own quantized
linears, on SmolLM2's q/v shapes, at 1, 64 and 512 tokens::

    .venv/bin/python -m experiments.et_a8_probe [--precision int4|int8] [--rounds 15]
        [--calls 20] [--layers 10] [--threads 2]

Per weight shape (q: chains ``x -> q_1 -> ... -> q_L`` of (576, 576) linears; v: (192, 576)
linears on the same x, concatenated) three programs of ``--layers`` linears each, the same
random weights:

- ``float``: ``edgeadapt::live_q4linear.out`` (int4: codes packed two per byte) or
  ``live_qlinear.out`` (int8), float activations: each 6-row slab dequantized, float tiles;
- ``a8``: their ``_a8`` forms (int8 activations in blocks of 32, integer products on
  vpdpbusd);
- ``xnnpack``: the linears quantized by torchao as the bundles' rest is
  (``executorch_quant.rest_config``: int8 per-token activations; int4 blocks of 32, or int8 per
  channel) and lowered to XNNPACK, constant weights (what a stock program runs).

Each round times ``--calls`` forwards of every program in turn (native runner, ``--threads``
threads). Prints per program the median time per linear and the medians of the per-round
ratios against ``xnnpack``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from experiments.et_q4_gemv_probe import Chain

SHAPES = {"q": (576, 576), "v": (192, 576)}
TOKENS = (1, 64, 512)
FORMS = ("float", "a8", "xnnpack")


def program(out: int, inp: int, layers: int, form: str, tokens: int, precision: str,
            seed: int = 0) -> bytes:
    """The program of ``layers`` linears (out, inp) in ``form`` for x (1, tokens, inp)."""
    from executorch.exir import to_edge_transform_and_lower

    from edgeadapt.export.executorch_live_form import QKernelLinear
    from edgeadapt.export.executorch_quant import rest_config
    from edgeadapt.format.quant import grid

    rng = np.random.default_rng(seed)
    mods: list[torch.nn.Module] = []
    for _ in range(layers):
        w = (rng.standard_normal((out, inp)) / np.sqrt(inp)).astype(np.float32)
        lin = torch.nn.Linear(inp, out, bias=False)
        if form == "xnnpack":
            lin.weight.data = torch.from_numpy(w)
            mods.append(lin)
            continue
        q, s = grid(precision).quantize(w)
        mods.append(QKernelLinear(lin, torch.from_numpy(q), torch.from_numpy(s),
                                  packed=precision == "int4",
                                  activations="int8" if form == "a8" else "float"))
    model = Chain(mods, fan=out != inp).eval()
    partitioner = []
    if form == "xnnpack":
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from torchao.quantization import quantize_

        with torch.no_grad():
            quantize_(model, rest_config(grid(precision)))
        partitioner = [XnnpackPartitioner()]
    ep = torch.export.export(model, (torch.randn(1, tokens, inp),), strict=False)
    return bytes(to_edge_transform_and_lower(ep, partitioner=partitioner)
                 .to_executorch().buffer)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--precision", choices=("int4", "int8"), default="int4")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from edgeadapt.runtime.backends.executorch.kernel import load_kernel
    from edgeadapt.runtime.backends.executorch.programs import open_program
    from edgeadapt.runtime.backends.executorch.store import use_threads

    use_threads(args.threads)
    load_kernel()
    methods, inputs = {}, {}
    for name, (out, inp) in SHAPES.items():
        for m in TOKENS:
            inputs[name, m] = np.random.default_rng(1).standard_normal(
                (1, m, inp)).astype(np.float32)
            for form in FORMS:
                blob = program(out, inp, args.layers, form, m, args.precision)
                prog = open_program(blob, f"{name} {form}")
                methods[name, m, form] = (prog, prog.method("forward"))
    times: dict[tuple, list[float]] = {k: [] for k in methods}
    for _ in range(args.rounds):
        for key, (_, method) in methods.items():
            x = [inputs[key[:2]]]
            method.execute(x)
            t0 = time.perf_counter()
            for _ in range(args.calls):
                method.execute(x)
            times[key].append((time.perf_counter() - t0) / args.calls / args.layers)
    print(f"{args.precision}, {args.layers} layers, {args.calls} calls x {args.rounds} rounds, "
          f"{args.threads} thread(s); us per linear (median); per-round ratios to xnnpack "
          "(median)")
    for name, (out, inp) in SHAPES.items():
        for m in TOKENS:
            ref = np.array(times[name, m, "xnnpack"])
            cells = []
            for form in FORMS:
                t = np.array(times[name, m, form])
                cells.append(f"{form} {1e6 * np.median(t):.1f}"
                             + ("" if form == "xnnpack" else f" ({np.median(t / ref):.3f})"))
            print(f"{name} {out}x{inp}, {m} tokens: " + "  ".join(cells))


if __name__ == "__main__":
    main()
