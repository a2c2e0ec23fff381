"""One benchmark run over a bundle: forward latency per variant, switch cost per method, the
switch floor, memory; every comparison interleaved within the run (:mod:`edgeadapt.timer`).

The parts, in the order :func:`run_bench` runs them per backend:

1. :mod:`~edgeadapt.bench.cases`: the runtimes and sessions each forward variant runs on;
2. :mod:`~edgeadapt.bench.forward`: each case checked against PyTorch, then timed interleaved;
3. :mod:`~edgeadapt.bench.switch`: the switch series, checked after they ran, before they are
   reported; the live-vs-repack break-even from both (:func:`break_even_row`);

then the PEFT peers on PyTorch (:mod:`~edgeadapt.bench.peers`), the switch floor
(:func:`edgeadapt.bench.floor.floor_section`) and the machine (:mod:`~edgeadapt.bench.host`).
A mismatch with PyTorch anywhere raises ParityError: nothing wrong is ever reported as fast.
"""

from __future__ import annotations

import gc
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeadapt.bench import floor as fl
from edgeadapt.bench.adapters import collect
from edgeadapt.bench.backends import PYTORCH, Target, parse_targets, unavailable
from edgeadapt.bench.cases import backend_cases
from edgeadapt.bench.forward import time_forward
from edgeadapt.bench.head import report_head
from edgeadapt.bench.host import gpu_name
from edgeadapt.bench.options import BenchContext, BenchOptions
from edgeadapt.bench.ort_adapter import onnx_load_errors
from edgeadapt.bench.parity import ParityLog
from edgeadapt.bench.reference import Subject
from edgeadapt.bench.switch import time_switches
from edgeadapt.bench.timing import break_even_runs
from edgeadapt.errors import BundleError, MissingPackageError
from edgeadapt.format.manifest import read_manifest
from edgeadapt.runtime.inputs import check_inputs

__all__ = ["BenchOptions", "break_even_row", "run_bench"]


@dataclass
class BackendResult:
    """What one backend contributed to the report."""

    forward: list[dict]
    switch: list[dict]
    memory: list[dict]
    skipped: list[dict]
    break_even: list[dict]
    threads: int | None
    live_form: str
    floor_round: fl.FloorRound


def measure_backend(ctx: BenchContext, target: Target, parity: ParityLog,
                    probe: fl.CopyProbe) -> BackendResult:
    """Cases, forward timings, switch timings and break-even of one available backend.
    MissingPackageError where it cannot start here after all (a package, the GPU); BundleError
    naming the file for an unreadable ONNX model."""
    try:
        built = backend_cases(ctx, target, parity.check_inputs)
    except onnx_load_errors() as exc:
        model = ctx.bundle / (ctx.manifest.onnxruntime or {}).get("file", "?")
        raise BundleError(f"{model}: not a readable ONNX model "
                          f"({type(exc).__name__}: {exc})") from exc
    forward = time_forward(ctx, target, built.cases, parity)
    switched = time_switches(ctx, target, built.runtimes, parity, probe)
    return BackendResult(
        forward, switched.rows, [*built.memory, switched.memory], built.skipped,
        [break_even_row(target, forward, switched.rows, b, s) for b, s in ctx.opts.shape_list()],
        built.threads, built.live_form, switched.floor_round)


def run_bench(bundle_dir: str | Path, opts: BenchOptions, subject: Subject | None = None,
              progress: Callable[[int], object] | None = None) -> dict:
    """Measure everything for ``bundle_dir``; returns the report (schema: edgeadapt.bench.schema).

    subject: the parity reference and input source (default: the bundle's PyTorch model).
    Backends that are unavailable here (no package, no GPU, no section of the bundle for them:
    :func:`~edgeadapt.bench.backends.unavailable`, or MissingPackageError while loading) are
    listed under ``skipped``; anything wrong with the bundle raises (BundleError naming the
    file for a corrupt model); ConfigError for an unknown backend.
    """
    bundle = Path(bundle_dir)
    manifest = read_manifest(bundle)
    targets = parse_targets(opts.backends, opts.device)
    if subject is None:
        from edgeadapt.bench.reference import TorchSubject

        subject = TorchSubject(manifest, bundle)
    lm = getattr(subject, "lm", None)  # a PyTorch subject: the PEFT peers run on its model
    if opts.peers and lm is not None:
        from edgeadapt.bench.peers import require_peft

        require_peft()
    results: dict[Target, BackendResult] = {}
    skipped: list[dict] = []
    extra_switch: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="edgeadapt-bench-") as scratch:
        aset = collect(bundle, manifest, Path(scratch), density=opts.density,
                       lora_rank=opts.lora_rank)
        ctx = BenchContext(bundle, manifest, opts, aset, Path(scratch), progress)
        parity = ParityLog(subject, aset, check_inputs(
            manifest.inputs, subject.inputs(*opts.shape_list()[0])))
        probe = fl.CopyProbe()
        for target in targets:
            reason = unavailable(target, manifest)
            if reason is None:
                try:
                    results[target] = measure_backend(ctx, target, parity, probe)
                except MissingPackageError as exc:  # unavailable here (a package, the GPU)
                    reason = f"{type(exc).__name__}: {exc}"
            if reason is not None:
                skipped.append({**target.fields(), "what": "all", "reason": reason})
            else:
                skipped.extend(results[target].skipped)
            gc.collect()  # the backend's runtimes go before the next one loads
        if opts.peers and lm is None:
            skipped.append({**PYTORCH.fields(), "what": "peft peers",
                            "reason": "the subject has no PyTorch model"})
        elif opts.peers:
            from edgeadapt.bench.peers import time_peers

            extra_switch = time_peers(ctx, lm, parity.rows)
        a, b = (aset.adapters[n] for n in aset.of("shira")[:2])
        floor = fl.floor_section(
            {n: d.indices for n, d in a.targets.items()},
            {n: d.indices for n, d in b.targets.items()},
            {n: tuple(w.shape) for n, w in manifest.weights.items()},
            {t.key: r.floor_round for t, r in results.items()},
            {n: (w.onnxruntime or {}).get("layout", "as-is") for n, w in manifest.weights.items()})
        floor["switch"] = " <-> ".join(aset.of("shira")[:2])
    ran = list(results.values())
    gpu = {"gpu": gpu_name()} if any(t.device == "cuda" for t in results) else {}
    return {**report_head(manifest, opts.threads,
                          {t.key: r.threads for t, r in results.items()},
                          {t.key: r.live_form for t, r in results.items()}), **gpu,
            "repeats": opts.repeats, "sessions": opts.sessions,
            "forward": [row for r in ran for row in r.forward],
            "switch": [row for r in ran for row in r.switch] + extra_switch,
            "floor": floor, "break_even": [row for r in ran for row in r.break_even],
            "memory": [row for r in ran for row in r.memory], "parity": parity.rows,
            "skipped": skipped, "adapters": aset.describe()}


def break_even_row(target: Target, forward: list[dict], switch: list[dict], batch: int,
                   seq: int) -> dict:
    """Runs per switch above which repack beats live on ``target`` at (batch, seq), from the
    p50s of the shira-live / shira-repack forwards and the live / repack SHiRA switches
    (:func:`edgeadapt.bench.timing.break_even_runs`); None where a part was not measured."""
    def fwd(variant: str) -> float | None:
        return next((r["p50_ms"] for r in forward
                     if (r["variant"], r["batch"], r["seq"]) == (variant, batch, seq)), None)

    def sw(mode: str) -> float | None:
        return next((r["p50_ms"] for r in switch
                     if (r["method"], r["mode"]) == ("shira", mode)), None)

    parts = (fwd("shira-live"), fwd("shira-repack"), sw("live"), sw("repack"))
    value = None if None in parts else break_even_runs(*parts)
    return {**target.fields(), "batch": batch, "seq": seq,
            "runs_per_switch": None if value is None or not np.isfinite(value) else value,
            "repack_never_wins": value is not None and not np.isfinite(value)}
