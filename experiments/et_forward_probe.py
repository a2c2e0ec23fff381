"""What a live (mutable-buffer) weight costs an ExecuTorch XNNPACK linear, with no model around
it (docs/bench.md, "ExecuTorch, run 2"):

    .venv/bin/python -m experiments.et_forward_probe [--tokens 1,64] [--rounds 40]

A chain of 60 linears with distinct (576, 576) weights (SmolLM2's q shape, 80 MB), lowered
five ways, each checked against PyTorch, then timed interleaved with the cache evicted before
every run: ``const`` (weights constant: XNNPACK packs them at load), ``live`` (weights mutable
buffers, the exporter's setup: the ``touch`` method, ``InitializedMutableBufferPass``, the
selective partition, so XNNPACK reads them at run time), ``blocked`` (buffers laid out
(out/32, in, 32) and multiplied as a batched matmul, the ONNX exporter's blocked32 form),
``portable`` (buffers (in, out), ``x @ W^T`` left to the runtime's own ``aten::mm`` kernel
instead of XNNPACK: the non-XNNPACK kernel the pip runtime has), ``w-as-a`` (``(W x^T)^T``:
the live weight as the GEMM's left operand, which XNNPACK does not pack; x^T is packed) and
``own-kernel`` (buffers (out, in) read by edgeadapt's own kernel ``edgeadapt::live_linear.out``,
edgeadapt/runtime/kernels/live_linear.cpp, the exporter's default form).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch import nn

from edgeadapt.numeric import rel_error
from edgeadapt.timer import time_interleaved

K, LAYERS, BLOCK = 576, 60, 32
KINDS = ("const", "live", "blocked", "portable", "w-as-a", "own-kernel")


class Chain(nn.Module):
    def __init__(self, kind: str, weights: list[torch.Tensor]) -> None:
        super().__init__()
        self.kind = kind
        for i, w in enumerate(weights):
            if kind == "const":
                self.register_parameter(f"w{i}", nn.Parameter(w.clone(), requires_grad=False))
            elif kind == "blocked":
                self.register_buffer(f"w{i}", w.reshape(K // BLOCK, BLOCK, K).transpose(1, 2)
                                     .contiguous())
            elif kind == "portable":
                self.register_buffer(f"w{i}", w.t().contiguous())
            else:
                self.register_buffer(f"w{i}", w.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(LAYERS):
            w = getattr(self, f"w{i}")
            if self.kind == "blocked":
                x = torch.matmul(x.unsqueeze(0), w).permute(1, 0, 2).reshape(x.shape[0], K)
            elif self.kind == "portable":
                x = torch.mm(x, w)
            elif self.kind == "w-as-a":
                x = torch.mm(w, x.t()).t()
            elif self.kind == "own-kernel":
                x = torch.ops.edgeadapt.live_linear(x, w)
            else:
                x = nn.functional.linear(x, w)
        return x


class Touch(nn.Module):
    """Mutates every buffer so that it is memory-planned (as the exporter's ``touch``)."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        for _, b in self.m.named_buffers():
            b.mul_(1)
        return z


def _undelegated_buffers(base: type) -> type:
    """``base`` (a GEMM config) refusing every GEMM that reads a buffer: left to the runtime."""
    from edgeadapt.export.executorch_partition import weight_is_buffer

    class Refuse(base):  # type: ignore[misc, valid-type]
        def check_constraints(self, node: torch.fx.Node, ep) -> bool:
            if weight_is_buffer(node, self.weight_idx, ep):
                return False
            return super().check_constraints(node, ep)

    return Refuse


def lower(m: nn.Module, x: torch.Tensor) -> bytes:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.init_mutable_pass import InitializedMutableBufferPass

    from edgeadapt.export.executorch_partition import selective_partitioner

    ep = torch.export.export(m, (x,), strict=False)
    if m.kind == "const":
        return bytes(to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
                     .to_executorch().buffer)
    methods = {"forward": ep, "touch": torch.export.export(Touch(m), (torch.zeros(1),),
                                                           strict=False)}
    phs = sorted({ph for e in methods.values()
                  for ph in e.graph_signature.inputs_to_buffers})
    part = selective_partitioner()
    if m.kind == "portable":
        from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
        from executorch.backends.xnnpack.partition.config.gemm_configs import (
            AddmmConfig,
            LinearConfig,
            MMConfig,
        )
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        part = XnnpackPartitioner(configs=[
            _undelegated_buffers(c) if c in (LinearConfig, AddmmConfig, MMConfig) else c
            for c in ALL_PARTITIONER_CONFIGS])
    edge = to_edge_transform_and_lower(methods, partitioner=[part])
    return bytes(edge.to_executorch(ExecutorchBackendConfig(
        passes=[InitializedMutableBufferPass(phs)],
        memory_planning_pass=MemoryPlanningPass(share_mutable_buffers=True),
        emit_mutable_buffer_names=True)).buffer)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="1,64")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset")
    args = ap.parse_args()
    from executorch.runtime import Runtime

    from edgeadapt.export.executorch_live_form import define_live_linear_op
    from edgeadapt.runtime.backends.executorch.kernel import load_kernel

    define_live_linear_op()
    load_kernel()
    torch.manual_seed(0)
    weights = [torch.randn(K, K) / K ** 0.5 for _ in range(LAYERS)]
    runtime = Runtime.get()
    keep = []  # a Method must not outlive its Program
    evict = (np.ones(32 << 20, np.float32), np.empty(32 << 20, np.float32))
    for tokens in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(tokens, K)
        methods = {}
        for kind in args.kinds.split(","):
            m = Chain(kind, weights).eval()
            buf = lower(m, x)
            prog = runtime.load_program(buf)
            method = prog.load_method("forward")
            keep.append((prog, buf))
            ref = m(x)
            err = rel_error(method.execute([x])[0].numpy(), ref.detach().numpy())
            assert err < 1e-4, (kind, err)
            methods[kind] = method
        timed = time_interleaved({k: (lambda m=m, x=x: m.execute([x])) for k, m in methods.items()},
                                 repeats=args.rounds, warmup=0,
                                 flush=lambda: np.copyto(evict[1], evict[0]))
        samples = {k: timed[k] for k in methods}
        base = float(np.median(samples["const"]))
        print(f"{tokens} token(s): " + ", ".join(
            f"{k} {np.median(v):.2f} ms ({np.median(v) / base:.2f}x)" for k, v in samples.items()))


if __name__ == "__main__":
    main()
