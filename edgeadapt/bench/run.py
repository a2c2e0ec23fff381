"""One benchmark run over a bundle: forward latency per variant, switch cost per method, the
switch floor, memory; every comparison interleaved within the run (edgeadapt.bench.timing).

Per backend and (batch, seq), the forward cases are timed together, interleaved:

- ``base``: every weight constant and packed (a repack-mode runtime never switched);
- ``shira-live`` / ``lora-fused``: live-mode runtimes with a SHiRA / LoRA adapter fused in;
- ``shira-repack``: a repack-mode runtime with the SHiRA adapter fused and repacked;
- ``lora-unfused`` / ``sora-unfused`` / ``sira-unfused``: the bundle's branch variant graphs,
  base weights packed, the adapter's tensors fed as inputs (ONNX Runtime CPU);
- ``ort-lora-adapter``: the LoRA variant driven by ONNX Runtime's own adapter API.

Before any case is timed its output is compared with the PyTorch reference carrying the same
adapter (:func:`edgeadapt.bench.reference.check_parity`); a mismatch raises ParityError.

Switches (each call a full switch: undo the previous adapter, apply the next, cycling between
two adapters): ``shira`` live and repack (rebuild included), ``lora-fuse`` (exact restore from
the saved matrices), ``reload`` (``edgeadapt.runtime.load`` of the bundle in repack mode: what
re-creating the session/program from files costs), ``ort-adapter`` (new RunOptions with the
other adapter active), and the PEFT peers on PyTorch.
"""

from __future__ import annotations

import gc
import itertools
import platform
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeadapt.bench import floor as fl
from edgeadapt.bench.adapters import collect
from edgeadapt.bench.reference import Subject, check_parity
from edgeadapt.bench.timing import (
    INSTANCE_SEP,
    Ratio,
    Stats,
    break_even_runs,
    combine_instances,
    instance_name,
    time_interleaved,
)
from edgeadapt.errors import ConfigError, EdgeAdaptError
from edgeadapt.format.manifest import Manifest, read_manifest

BACKEND_SPECS = {"onnxruntime-cpu": ("onnxruntime", "cpu"),
                 "onnxruntime-cuda": ("onnxruntime", "cuda"),
                 "executorch": ("executorch", "cpu")}


@dataclass
class BenchOptions:
    """What to measure. ``reload_repeats`` bounds the slow cases (reload, repack switch)."""

    backends: list[str] = field(default_factory=lambda: ["onnxruntime-cpu", "executorch"])
    batches: list[int] = field(default_factory=lambda: [1, 8])
    seqs: list[int] = field(default_factory=lambda: [64])
    shapes: list[tuple[int, int]] | None = None  # explicit (batch, seq) pairs override
    repeats: int = 20
    warmup: int = 3
    switch_repeats: int = 50
    reload_repeats: int = 5
    threads: int = 1
    sessions: int = 1  # independent sessions/programs per forward variant, all interleaved
    density: float = 0.01
    lora_rank: int = 16
    peers: bool = True

    def shape_list(self) -> list[tuple[int, int]]:
        if self.shapes:
            return list(self.shapes)
        return [(b, s) for b in self.batches for s in self.seqs]


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _cycle_switch(switch: Callable[[str], object], names: list[str]) -> Callable[[], None]:
    it = itertools.cycle(names)

    def call() -> None:
        switch(next(it))
    return call


class _Run:
    def __init__(self, bundle_dir: Path, subject: Subject, opts: BenchOptions,
                 progress: Callable[[int], object] | None) -> None:
        self.bundle = bundle_dir
        self.manifest = read_manifest(bundle_dir)
        self.subject = subject
        self.opts = opts
        self.progress = progress
        self.forward: list[dict] = []
        self.switch: list[dict] = []
        self.skipped: list[dict] = []
        self.memory: list[dict] = []
        self.break_even: list[dict] = []
        self.parity: list[dict] = []
        self.copy_probe = fl.CopyProbe()
        self.floor_rounds: dict[str, tuple[list[float], np.ndarray]] = {}
        self.threads: dict[str, int | None] = {}  # backend -> intra-op threads it ran with
        self.live_forms: dict[str, str] = {}  # backend -> Runtime.live_form of its live runs

    # -- helpers ---------------------------------------------------------------------------

    def _skip(self, backend: str, what: str, reason: str) -> None:
        self.skipped.append({"backend": backend, "what": what, "reason": reason})

    def _load(self, backend: str, mode: str):
        from edgeadapt.runtime import load

        name, device = BACKEND_SPECS[backend]
        rt = load(self.bundle, backend=name, device=device, mode=mode,
                  threads=self.opts.threads)
        self.aset.register(rt.manifest)
        # ExecuTorch reports the size of its per-process threadpool (edgeadapt.runtime.
        # executorch_backend.use_threads); ONNX Runtime sessions take opts.threads as given
        self.threads[backend] = getattr(rt.store, "threads", self.opts.threads)
        if mode == "live":  # how live mode reads the live weights (own-kernel, blocked32, ...)
            self.live_forms[backend] = rt.live_form
        return rt

    def _parity(self, backend: str, case: str, fn: Callable[[dict], np.ndarray],
                adapter_name: str | None, inputs: dict, refs: dict) -> None:
        """Check ``fn`` against the PyTorch reference; ``refs`` caches references per adapter
        for these inputs (every instance of a variant compares with the same one)."""
        if adapter_name not in refs:
            adapter = self.aset.adapters[adapter_name] if adapter_name else None
            refs[adapter_name] = self.subject.reference(adapter, inputs)
        err = check_parity(fn(inputs), refs[adapter_name], f"{backend} {case}")
        variant, _, instance = case.partition(INSTANCE_SEP)
        self.parity.append({"backend": backend, "variant": variant,
                            "instance": int(instance or 0),
                            "batch": int(next(iter(inputs.values())).shape[0]),
                            "max_rel_error": err})

    # -- forward ---------------------------------------------------------------------------

    def _forward_cases(self, backend: str) -> dict[str, tuple[Callable, str | None]]:
        """case -> (run(inputs) callable, adapter name) for one backend: ``variant#i`` for each
        of the ``opts.sessions`` instances of every variant (each its own session/program)."""
        cases: dict[str, tuple[Callable, str | None]] = {}
        for i in range(self.opts.sessions):
            one = self._forward_instance(backend, first=i == 0)
            cases.update({instance_name(v, i): case for v, case in one.items()})
        return cases

    def _forward_instance(self, backend: str, first: bool
                          ) -> dict[str, tuple[Callable, str | None]]:
        """variant -> (run(inputs) callable, adapter name): one fresh runtime per variant. The
        first instance also records memory and serves the switch timings."""
        shira, lora = self.aset.of("shira"), self.aset.of("lora")
        cases: dict[str, tuple[Callable, str | None]] = {}
        memory: list[dict] = []
        rss0 = _rss()
        base = self._load(backend, "repack" if backend != "onnxruntime-cuda" else "live")
        memory.append({"backend": backend, "runtime": "base", "rss_delta_bytes": _rss() - rss0})
        cases["base"] = (lambda x, rt=base: rt.run(**x), None)
        rss0 = _rss()
        live = self._load(backend, "live")
        live.switch(shira[0])
        memory.append({"backend": backend, "runtime": "live", "rss_delta_bytes": _rss() - rss0,
                       "restore_bytes_shira": live.restore_memory_bytes()})
        cases["shira-live"] = (lambda x, rt=live: rt.run(**x), shira[0])
        repack = None
        if backend != "onnxruntime-cuda":
            repack = self._load(backend, "repack")
            repack.switch(shira[0])
            cases["shira-repack"] = (lambda x, rt=repack: rt.run(**x), shira[0])
        elif first:
            self._skip(backend, "shira-repack", "CUDA kernels read raw weights: live only")
        lora_rt = self._load(backend, "live")
        lora_rt.switch(lora[0])
        memory.append({"backend": backend, "runtime": "live+lora", "restore_bytes_lora":
                       lora_rt.restore_memory_bytes()})
        cases["lora-fused"] = (lambda x, rt=lora_rt: rt.run(**x), lora[0])
        cases.update(self._unfused_cases(backend, first))
        if first:
            self.memory.extend(memory)
            self.rt_live, self.rt_repack, self.rt_lora = live, repack, lora_rt
        return cases

    def _unfused_cases(self, backend: str, first: bool
                       ) -> dict[str, tuple[Callable, str | None]]:
        from edgeadapt.bench.unfused import unfused_cases

        if backend != "onnxruntime-cpu":
            if first:
                self._skip(backend, "unfused variants", "measured on onnxruntime-cpu only")
            return {}
        cases, peer, reasons = unfused_cases(self.bundle, self.manifest, self.aset,
                                             self.scratch, self.opts.threads)
        if first:
            self.ort_peer = peer
            for what, reason in reasons.items():
                self._skip(backend, what, reason)
        return cases

    def run_forward(self, backend: str, cases: dict) -> None:
        for batch, seq in self.opts.shape_list():
            inputs = self.subject.inputs(batch, seq)
            refs: dict = {}
            for case, (fn, adapter) in cases.items():
                self._parity(backend, case, fn, adapter, inputs, refs)
            samples = time_interleaved({c: (lambda f=fn, x=inputs: f(x)) for c, (fn, _) in
                                        cases.items()}, repeats=self.opts.repeats,
                                       warmup=self.opts.warmup, progress=self.progress)
            pooled, per_round = combine_instances(samples)
            for variant, st in ((v, Stats.of(s)) for v, s in pooled.items()):
                row = {"backend": backend, "variant": variant, "batch": batch, "seq": seq,
                       "sessions": self.opts.sessions, **st.as_dict()}
                r = Ratio.of(per_round, variant, "base")
                row.update(ratio_vs_base=r.paired_median, ratio_vs_base_p10=r.paired_p10,
                           ratio_vs_base_p90=r.paired_p90)
                self.forward.append(row)

    # -- switch ----------------------------------------------------------------------------

    def run_switch(self, backend: str) -> None:
        shira, lora = self.aset.of("shira")[:2], self.aset.of("lora")[:2]
        fast = {"shira": _cycle_switch(self.rt_live.switch, shira),
                "lora-fuse": _cycle_switch(self.rt_lora.switch, lora)}
        if getattr(self, "ort_peer", None) is not None and backend == "onnxruntime-cpu":
            peer, files = self.ort_peer
            loaded = [peer.load(f) for f in files]
            fast["ort-adapter"] = _cycle_switch(lambda a: peer.activate(a), loaded)
        fast["copy"] = self.copy_probe  # the floor's bandwidth, in the same rounds
        samples = time_interleaved(fast, repeats=self.opts.switch_repeats,
                                   warmup=self.opts.warmup, progress=self.progress)
        layouts = {n: lw.layout for n, lw in self.rt_live.store.live_weights().items()}
        self.floor_rounds[backend] = (samples["shira"],
                                      self.copy_probe.bandwidth(samples.pop("copy")), layouts)
        modes = {"shira": "live", "lora-fuse": "live", "ort-adapter": "unfused"}
        for method, s in samples.items():
            self._switch_row(backend, method, modes[method], s)
        self.live_switch_samples = samples["shira"]
        self.memory.append({"backend": backend, "runtime": "live after switches",
                            "restore_bytes_shira": self.rt_live.restore_memory_bytes(),
                            "plan_cache_bytes_shira": self.rt_live.plan_cache_bytes(),
                            # ExecuTorch: live buffers moved to huge pages at load (pages.py)
                            "collapsed_bytes": getattr(self.rt_live.store, "collapsed_bytes",
                                                       None),
                            "restore_bytes_lora": self.rt_lora.restore_memory_bytes()})
        slow = {"shira": fast["shira"], "reload": self._reload_case(backend)}
        if self.rt_repack is not None:
            slow["shira-repack"] = _cycle_switch(self.rt_repack.switch, shira)
        samples = time_interleaved(slow, repeats=self.opts.reload_repeats, warmup=1,
                                   progress=self.progress)
        self._switch_row(backend, "reload", "repack", samples["reload"])
        if "shira-repack" in samples:
            self._switch_row(backend, "shira", "repack", samples["shira-repack"])

    def _reload_case(self, backend: str) -> Callable[[], None]:
        from edgeadapt.runtime import load

        name, device = BACKEND_SPECS[backend]
        mode = "live" if device == "cuda" else "repack"

        def reload() -> None:
            rt = load(self.bundle, backend=name, device=device, mode=mode,
                      threads=self.opts.threads, verify_base=False)
            del rt
        return reload

    def _switch_row(self, backend: str, method: str, mode: str, samples: list[float]) -> None:
        self.switch.append({"backend": backend, "method": method, "mode": mode,
                            **Stats.of(samples).as_dict()})

    def run_peers(self) -> None:
        from edgeadapt.bench.peers import peft_lora_model, peft_shira_model, peft_switcher

        lm = getattr(self.subject, "lm", None)
        if lm is None:
            self._skip("pytorch", "peft peers", "the subject has no PyTorch model")
            return
        shira = [self.aset.adapters[n] for n in self.aset.of("shira")[:2]]
        lora = [self.aset.adapters[n] for n in self.aset.of("lora")[:2]]
        for method, build, ads in (("peft-shira-merge", peft_shira_model, shira),
                                   ("peft-lora-merge", peft_lora_model, lora)):
            pm, _ = build(lm.model, ads)
            s = time_interleaved({method: peft_switcher(pm, ["a0", "a1"])},
                                 repeats=self.opts.switch_repeats, warmup=self.opts.warmup,
                                 progress=self.progress)
            self._switch_row("pytorch", method, "merge", s[method])
            del pm
            gc.collect()

    # -- floor -----------------------------------------------------------------------------

    def floor(self) -> dict:
        """The floor of the timed SHiRA switch: the traffic (edgeadapt.bench.floor) in the
        layouts the backend's live buffers really have (ONNX ``blocked32`` / ``transposed``,
        ExecuTorch ``as-is``) over the copy bandwidth timed in the same rounds as the switch,
        per backend (``per_backend``). The top level is the first timed backend's (the ONNX
        layouts and a standalone bandwidth measurement when no backend timed a switch)."""
        a, b = (self.aset.adapters[n] for n in self.aset.of("shira")[:2])
        shapes = {n: tuple(w.shape) for n, w in self.manifest.weights.items()}

        def traffic(layouts: dict[str, str]) -> fl.SwitchTraffic:
            return fl.switch_traffic({n: d.indices for n, d in a.targets.items()},
                                     {n: d.indices for n, d in b.targets.items()}, shapes,
                                     layouts=layouts)

        traffics = {be: traffic(layouts) for be, (_, _, layouts) in self.floor_rounds.items()}
        per_backend = {be: {**fl.floor_ratios(sw, bw, traffics[be]), **traffics[be].as_dict(),
                            "layouts": sorted(set(layouts.values()))}
                       for be, (sw, bw, layouts) in self.floor_rounds.items()}
        if self.floor_rounds:
            first, (_, bws, _) = next(iter(self.floor_rounds.items()))
            top, bw, source = traffics[first], float(np.median(bws)), first
        else:  # no backend timed a switch: a standalone measurement (best of 5 copies)
            layouts = {n: (w.onnx or {}).get("layout", "as-is")
                       for n, w in self.manifest.weights.items()}
            top, bw, source = traffic(layouts), fl.measure_bandwidth(), "onnx layouts"
        return {"shira_switch_ms": fl.floor_ms(top, bw), "bandwidth_GBps": bw / 1e9,
                "switch": f"{self.aset.of('shira')[0]} <-> {self.aset.of('shira')[1]}",
                "layout": source, "per_backend": per_backend,
                "measured_over_floor": {be: r["measured_over_floor"]
                                        for be, r in per_backend.items()},
                **top.as_dict()}


def device_name() -> str:
    """The CPU model (from /proc/cpuinfo where there is one) and the visible core count."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return f"{cpu}, {os.cpu_count()} cores visible"


def run_bench(bundle_dir: str | Path, opts: BenchOptions, subject: Subject | None = None,
              progress: Callable[[int], object] | None = None) -> dict:
    """Measure everything for ``bundle_dir``; returns the report (schema: edgeadapt.bench.schema).

    subject: the parity reference and input source (default: the bundle's PyTorch model).
    Backends that cannot start here are listed under ``skipped``, not raised.
    """
    bundle = Path(bundle_dir)
    manifest: Manifest = read_manifest(bundle)
    unknown = [b for b in opts.backends if b not in BACKEND_SPECS]
    if unknown:
        raise ConfigError(f"unknown backends {unknown}: choose from {', '.join(BACKEND_SPECS)}")
    if subject is None:
        from edgeadapt.bench.reference import TorchSubject

        subject = TorchSubject(manifest)
    run = _Run(bundle, subject, opts, progress)
    with tempfile.TemporaryDirectory(prefix="edgeadapt-bench-") as scratch:
        run.scratch = Path(scratch)
        run.aset = collect(bundle, manifest, run.scratch, density=opts.density,
                           lora_rank=opts.lora_rank)
        for backend in opts.backends:
            try:
                cases = run._forward_cases(backend)
            except (EdgeAdaptError, ImportError, OSError, RuntimeError, TypeError) as exc:
                # a backend that cannot start here (no GPU, no .pte, a backend bug) is
                # reported, not fatal: the other backends still get measured
                run._skip(backend, "all", f"{type(exc).__name__}: {exc}")
                gc.collect()
                continue
            run.run_forward(backend, cases)
            run.run_switch(backend)
            for batch, seq in opts.shape_list():
                run.break_even.append(_break_even(run, backend, batch, seq))
            run.rt_live = run.rt_repack = run.rt_lora = run.ort_peer = None
            del cases
            gc.collect()
        if opts.peers:
            run.run_peers()
        floor = run.floor()
    return {"model": manifest.model, "device": device_name(), "targets_spec":
            manifest.targets_spec, "live_weights": len(manifest.weights),
            "live_params": int(sum(np.prod(w.shape) for w in manifest.weights.values())),
            "threads": opts.threads, "threads_by_backend": run.threads,
            "live_form_by_backend": run.live_forms,
            "repeats": opts.repeats, "sessions": opts.sessions,
            "forward": run.forward,
            "switch": run.switch, "floor": floor, "break_even": run.break_even,
            "memory": run.memory, "parity": run.parity, "skipped": run.skipped,
            "adapters": {n: {"method": e.method, "variant": e.variant,
                             "synthetic": n in run.aset.synthetic}
                         for n, e in run.aset.entries.items()}}


def _break_even(run: _Run, backend: str, batch: int, seq: int) -> dict:
    def fwd(variant: str) -> float | None:
        return next((r["p50_ms"] for r in run.forward if (r["backend"], r["variant"],
                     r["batch"], r["seq"]) == (backend, variant, batch, seq)), None)

    def sw(mode: str) -> float | None:
        return next((r["p50_ms"] for r in run.switch if (r["backend"], r["method"],
                     r["mode"]) == (backend, "shira", mode)), None)

    parts = (fwd("shira-live"), fwd("shira-repack"), sw("live"), sw("repack"))
    value = None if None in parts else break_even_runs(*parts)
    return {"backend": backend, "batch": batch, "seq": seq,
            "runs_per_switch": None if value is None or not np.isfinite(value) else value,
            "repack_never_wins": value is not None and not np.isfinite(value)}
