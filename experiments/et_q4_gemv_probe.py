"""One-token time of edgeadapt's ExecuTorch int4 kernel, codes packed two per byte
(``edgeadapt::live_q4linear.out``) against a code per byte (``edgeadapt::live_qlinear.out``),
on SmolLM2's q/v shapes::

    .venv/bin/python -m experiments.et_q4_gemv_probe [--rounds 15] [--calls 200] [--layers 30]
        [--threads 1] [--evict 64]

Four programs of ``--layers`` quantized live linears each (lowered without XNNPACK, the codes
mutable buffers as in a bundle): ``q`` chains (576, 576) linears ``x -> q_1 -> ... -> q_L``;
``v`` runs (192, 576) linears on the same x and concatenates their outputs; one form each.
``--layers 30``: SmolLM2's q/v weights, 10 + 3.3 MB of codes a code per byte (L3, not L2);
``--layers 1``: one weight, hot in L2. Each round times ``--calls`` one-token forwards of
every program in turn (native runner, ``--threads`` threads); prints per program the median
time per linear and the median of the per-round ratios packed / one-byte. ``--evict MB``: before
each forward, write MB of memory (not timed), as the rest of a model's weights stream through
the caches between two of its live linears: the codes then come from memory.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

SHAPES = {"q": (576, 576), "v": (192, 576)}


class Chain(torch.nn.Module):
    """``x -> l_1 -> ... -> l_L`` (square weights) or ``cat(l_i(x))`` (``fan``)."""

    def __init__(self, layers: list[torch.nn.Module], fan: bool) -> None:
        super().__init__()
        self.layers, self.fan = torch.nn.ModuleList(layers), fan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fan:
            return torch.cat([lin(x) for lin in self.layers], dim=-1)
        for lin in self.layers:
            x = lin(x)
        return x


def program(out: int, inp: int, layers: int, packed: bool, seed: int = 0) -> bytes:
    """The program of ``layers`` quantized live linears (out, inp), codes as buffers."""
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass

    from edgeadapt.export.executorch_live_form import QKernelLinear
    from edgeadapt.format.quant import INT4

    rng = np.random.default_rng(seed)
    mods = []
    for _ in range(layers):
        w = (rng.standard_normal((out, inp)) / np.sqrt(inp)).astype(np.float32)
        q, s = INT4.quantize(w)
        mods.append(QKernelLinear(torch.nn.Linear(inp, out, bias=False), torch.from_numpy(q),
                                  torch.from_numpy(s), packed))
    model = Chain(mods, fan=out != inp).eval()
    ep = torch.export.export(model, (torch.randn(1, 1, inp),), strict=False)
    edge = to_edge_transform_and_lower(ep, partitioner=[])
    return bytes(edge.to_executorch(ExecutorchBackendConfig(
        memory_planning_pass=MemoryPlanningPass())).buffer)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--evict", type=int, default=0, help="MB written before each forward")
    args = ap.parse_args()

    from edgeadapt.runtime.backends.executorch.kernel import load_kernel
    from edgeadapt.runtime.backends.executorch.programs import open_program
    from edgeadapt.runtime.backends.executorch.store import use_threads

    use_threads(args.threads)
    load_kernel()
    methods, inputs = {}, {}
    for name, (out, inp) in SHAPES.items():
        inputs[name] = np.random.default_rng(1).standard_normal((1, 1, inp)).astype(np.float32)
        for packed in (False, True):
            prog = open_program(program(out, inp, args.layers, packed), f"{name} {packed}")
            methods[name, packed] = (prog, prog.method("forward"))
        a = methods[name, False][1].execute([inputs[name]])[0]
        b = methods[name, True][1].execute([inputs[name]])[0]
        assert np.array_equal(a, b), f"{name}: the two forms differ"
    times: dict[tuple[str, bool], list[float]] = {k: [] for k in methods}
    junk = np.zeros(args.evict << 20, np.uint8)
    for _ in range(args.rounds):
        for key, (_, method) in methods.items():
            x = [inputs[key[0]]]
            method.execute(x)
            total = 0.0
            t0 = time.perf_counter()
            for i in range(args.calls):
                if junk.size:
                    junk.fill(i)
                    t0 = time.perf_counter()
                method.execute(x)
                if junk.size:
                    total += time.perf_counter() - t0
            if not junk.size:
                total = time.perf_counter() - t0
            times[key].append(total / args.calls / args.layers)
    print(f"{args.layers} layers, {args.calls} calls x {args.rounds} rounds, "
          f"{args.threads} thread(s), {args.evict} MB evicted per forward; "
          "us per linear (median), packed / one-byte")
    for name, (out, inp) in SHAPES.items():
        one, two = np.array(times[name, False]), np.array(times[name, True])
        print(f"{name} {out}x{inp}: one-byte {1e6 * np.median(one):.2f}  packed "
              f"{1e6 * np.median(two):.2f}  ratio p50 {np.median(two / one):.3f} "
              f"(min {np.min(two / one):.3f}, max {np.max(two / one):.3f})")


if __name__ == "__main__":
    main()
