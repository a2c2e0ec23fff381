"""The forward cases of one backend: which runtime or session each variant runs on.

- ``base``: every weight constant and packed (a repack-mode runtime never switched; live on
  CUDA, where kernels read raw weights: nothing to repack);
- ``shira-live`` / ``lora-fused``: live-mode runtimes with a SHiRA / LoRA adapter fused in;
- ``shira-repack``: a repack-mode runtime with the SHiRA adapter fused and repacked;
- ``lora-unfused`` / ``sora-unfused`` / ``sira-unfused`` / ``ort-lora-adapter``: the bundle's
  branch variant graphs on ONNX Runtime CPU (:mod:`edgeadapt.bench.unfused`).

Each of the ``opts.sessions`` instances of a variant is its own runtime / session (case name
``variant#i``). The first instance also measures memory and hands its runtimes to the switch
timings (:class:`SwitchRuntimes`). Every case runs the store's forward (``rt.store.run``) on
inputs checked once, outside the timed loop, as the unfused sessions do: each case times the
model's forward alone.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field, replace

import numpy as np

from edgeadapt.bench.backends import Target
from edgeadapt.bench.host import rss_bytes
from edgeadapt.bench.options import BenchContext
from edgeadapt.bench.timing import instance_name
from edgeadapt.bench.unfused import Case, OrtAdapterPeer, unfused_cases
from edgeadapt.runtime import Runtime, load

#: the runtime mode each forward variant runs in (the CUDA base is live: nothing to repack)
VARIANT_MODES = {"base": "repack", "shira-live": "live", "shira-repack": "repack",
                 "lora-fused": "live", "lora-unfused": "unfused", "sora-unfused": "unfused",
                 "sira-unfused": "unfused", "ort-lora-adapter": "unfused"}


def variant_mode(target: Target, variant: str) -> str:
    """The runtime mode ``variant`` runs in on ``target`` (:data:`VARIANT_MODES`)."""
    if variant == "base" and target.device == "cuda":
        return "live"
    return VARIANT_MODES[variant]


def reload_mode(target: Target) -> str:
    """The mode a timed reload loads in: repack (a packed session or program), live on CUDA."""
    return "live" if target.device == "cuda" else "repack"


@dataclass
class SwitchRuntimes:
    """The first instance's runtimes, which the switch timings switch, and each one's output
    on the run's check inputs before its first switch (``base_out``: role -> logits)."""

    live: Runtime
    repack: Runtime | None
    lora: Runtime
    ort_peer: OrtAdapterPeer | None
    base_out: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class BackendCases:
    """Everything :func:`backend_cases` built and learnt for one backend."""

    cases: dict[str, Case]
    runtimes: SwitchRuntimes
    memory: list[dict]
    skipped: list[dict]
    threads: int | None  # the intra-op threads its runtimes run with
    live_form: str       # how live mode reads the live weights (own-kernel, blocked32, ...)


def load_runtime(ctx: BenchContext, target: Target, mode: str, *, adapters: bool = True,
                 verify_base: bool = True) -> Runtime:
    """``edgeadapt.runtime.load`` of the bundle on ``target``; ``adapters``: the run's
    synthetic adapters registered on its in-memory manifest."""
    rt = load(ctx.bundle, backend=target.backend, device=target.device, mode=mode,
              threads=ctx.opts.threads, verify_base=verify_base)
    if adapters:
        ctx.adapters.register(rt.manifest)
    return rt


def backend_cases(ctx: BenchContext, target: Target, check_inputs: dict[str, np.ndarray]
                  ) -> BackendCases:
    """Case ``variant#i`` -> (run, adapter) for each of the ``opts.sessions`` instances of every
    variant, plus the first instance's runtimes, memory rows and skips."""
    first = _instance(ctx, target, check_inputs, first=True)
    cases = {instance_name(v, 0): c for v, c in first.cases.items()}
    for i in range(1, ctx.opts.sessions):
        one = _instance(ctx, target, check_inputs, first=False)
        cases.update({instance_name(v, i): c for v, c in one.cases.items()})
    return replace(first, cases=cases)


def _instance(ctx: BenchContext, target: Target, check_in: dict[str, np.ndarray],
              first: bool) -> BackendCases:
    """variant -> (run, adapter): one fresh runtime per variant."""
    shira, lora = ctx.adapters.of("shira"), ctx.adapters.of("lora")
    cases: dict[str, Case] = {}
    memory: list[dict] = []
    skipped: list[dict] = []
    where = target.fields()
    base_mode = variant_mode(target, "base")
    if first:  # a throwaway load: the first load of a process pays one-time setup
        warm = load_runtime(ctx, target, base_mode)
        del warm
        gc.collect()
    rss0 = rss_bytes()
    base = load_runtime(ctx, target, base_mode)
    memory.append({**where, "runtime": "base", "mode": base_mode,
                   "rss_delta_bytes": rss_bytes() - rss0})
    cases["base"] = (lambda x, rt=base: rt.store.run(x), None)
    rss0 = rss_bytes()
    live = load_runtime(ctx, target, "live")
    base_out = {"live": live.store.run(check_in)} if first else {}
    live.switch(shira[0])
    memory.append({**where, "runtime": "live", "rss_delta_bytes": rss_bytes() - rss0,
                   "restore_bytes_shira": live.restore_memory_bytes()})
    cases["shira-live"] = (lambda x, rt=live: rt.store.run(x), shira[0])
    repack = None
    if target.device != "cuda":
        repack = load_runtime(ctx, target, "repack")
        if first:
            base_out["repack"] = repack.store.run(check_in)
        repack.switch(shira[0])
        cases["shira-repack"] = (lambda x, rt=repack: rt.store.run(x), shira[0])
    elif first:
        skipped.append({**where, "what": "shira-repack",
                        "reason": "CUDA kernels read raw weights: live only"})
    lora_rt = load_runtime(ctx, target, "live")
    if first:
        base_out["lora"] = lora_rt.store.run(check_in)
    lora_rt.switch(lora[0])
    memory.append({**where, "runtime": "live+lora",
                   "restore_bytes_lora": lora_rt.restore_memory_bytes()})
    cases["lora-fused"] = (lambda x, rt=lora_rt: rt.store.run(x), lora[0])
    peer = None
    if target == Target("onnxruntime", "cpu"):
        unfused, peer, reasons = unfused_cases(ctx.bundle, ctx.manifest, ctx.adapters,
                                               ctx.scratch, ctx.opts.threads)
        cases.update(unfused)
        skipped.extend({**where, "what": what, "reason": reason}
                       for what, reason in reasons.items())
    else:
        skipped.append({**where, "what": "unfused variants",
                        "reason": "measured on onnxruntime:cpu only"})
    # ExecuTorch reports the size of its per-process threadpool (it may differ from
    # opts.threads); ONNX Runtime sessions take opts.threads as given
    threads = ctx.opts.threads if base.store.threads is None else base.store.threads
    return BackendCases(cases, SwitchRuntimes(live, repack, lora_rt, peer, base_out),
                        memory, skipped if first else [], threads, live.live_form)
