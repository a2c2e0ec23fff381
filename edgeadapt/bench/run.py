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
from edgeadapt.bench.ort_adapter import onnx_load_errors
from edgeadapt.bench.reference import Subject, check_parity
from edgeadapt.bench.timing import (
    INSTANCE_SEP,
    Ratio,
    Stats,
    break_even_runs,
    combine_instances,
    flush_key,
    instance_name,
    time_interleaved,
)
from edgeadapt.errors import BundleError, ConfigError, MissingPackageError, ParityError
from edgeadapt.format.manifest import Manifest, read_manifest
from edgeadapt.runtime.inputs import check_inputs

BACKEND_SPECS = {"onnxruntime-cpu": ("onnxruntime", "cpu"),
                 "onnxruntime-cuda": ("onnxruntime", "cuda"),
                 "executorch": ("executorch", "cpu")}

# the runtime mode each forward variant runs in (the CUDA base is live: nothing to repack)
VARIANT_MODES = {"base": "repack", "shira-live": "live", "shira-repack": "repack",
                 "lora-fused": "live", "lora-unfused": "unfused", "sora-unfused": "unfused",
                 "sira-unfused": "unfused", "ort-lora-adapter": "unfused"}

PEFT_WEIGHT_TOL = 1e-4  # PEFT merges / unmerges by addition / subtraction: float32 drift


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


class _Cycle:
    """One full switch per call, cycling through ``names``; remembers the last one applied so
    that an untimed check in between can put the runtime back (:meth:`restore`)."""

    def __init__(self, switch: Callable[[object], object], names: list) -> None:
        self.switch = switch
        self.names = list(names)
        self._it = itertools.cycle(self.names)
        self.last: object = None

    def __call__(self) -> None:
        self.last = next(self._it)
        self.switch(self.last)

    def restore(self) -> None:
        if self.last is not None:
            self.switch(self.last)


def unavailable(backend: str, manifest: Manifest) -> str | None:
    """Why ``backend`` cannot run here at all (no package, no section of the bundle for it, no
    GPU), or None. Only this skips a backend; anything wrong with the bundle raises."""
    name, device = BACKEND_SPECS[backend]
    if name == "onnxruntime":
        if not manifest.onnx:
            return "the bundle has no ONNX model (export with --formats onnx)"
        try:
            import onnxruntime as ort
        except ImportError:
            return "onnxruntime is not installed"
        if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            return "no CUDA execution provider here (onnxruntime-gpu)"
        return None
    if not manifest.executorch:
        return "the bundle has no ExecuTorch program (export with --formats pte)"
    return None


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
        # backend -> (shira switch ms, copy bandwidth, layouts, buffer offsets), per round
        self.floor_rounds: dict[str, tuple] = {}
        self.threads: dict[str, int | None] = {}  # backend -> intra-op threads it ran with
        self.live_forms: dict[str, str] = {}  # backend -> Runtime.live_form of its live runs
        batch, seq = opts.shape_list()[0]  # the switch checks' inputs and their references
        self.check_shape = (batch, seq)
        self.check_in = check_inputs(self.manifest.inputs, subject.inputs(batch, seq))
        self.check_refs: dict[str | None, np.ndarray] = {}
        self.base_out: dict[str, np.ndarray] = {}  # role -> output before its first switch

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

    def _row(self, backend: str, variant: str, inputs: dict, err: float, **extra) -> None:
        x = next(iter(inputs.values()))
        self.parity.append({"backend": backend, "variant": variant,
                            "instance": extra.pop("instance", 0), "batch": int(x.shape[0]),
                            "seq": int(x.shape[1]) if x.ndim > 1 else None,
                            "max_rel_error": err, **extra})

    def _parity(self, backend: str, case: str, fn: Callable[[dict], np.ndarray],
                adapter_name: str | None, inputs: dict, refs: dict) -> None:
        """Check ``fn`` against the PyTorch reference; ``refs`` caches references per adapter
        for these inputs (every instance of a variant compares with the same one)."""
        if adapter_name not in refs:
            adapter = self.aset.adapters[adapter_name] if adapter_name else None
            refs[adapter_name] = self.subject.reference(adapter, inputs)
        err = check_parity(fn(inputs), refs[adapter_name], f"{backend} {case}")
        variant, _, instance = case.partition(INSTANCE_SEP)
        self._row(backend, variant, inputs, err, instance=int(instance or 0), check="forward",
                  adapter=adapter_name)

    def _ref(self, adapter_name: str | None) -> np.ndarray:
        if adapter_name not in self.check_refs:
            adapter = self.aset.adapters[adapter_name] if adapter_name else None
            self.check_refs[adapter_name] = self.subject.reference(adapter, self.check_in)
        return self.check_refs[adapter_name]

    def _check_switch(self, backend: str, method: str, mode: str, variant: str,
                      cycle: _Cycle, adapters: list[str | None],
                      run: Callable[[dict], np.ndarray], to_base: Callable[[], object],
                      base_out: np.ndarray | None) -> None:
        """After a timed switch series, before its timings are reported: switch to each
        adapter of the cycle (``cycle.names[i]`` is ``adapters[i]``) and compare one forward of
        the switched runtime with PyTorch carrying that adapter; then back to the base, which
        must match the base reference and, where the mode restores exactly (``base_out``: the
        same runtime's output before its first switch), be bit-identical to it. ParityError
        otherwise. The runtime is left as the series left it."""
        what = f"{backend} {method} switch ({mode})"
        for arg, name in zip(cycle.names, adapters, strict=True):
            cycle.switch(arg)
            err = check_parity(run(self.check_in), self._ref(name), f"{what} to {name}")
            self._row(backend, variant, self.check_in, err, check="switch", method=method,
                      mode=mode, adapter=name)
        to_base()
        got = run(self.check_in)
        err = check_parity(got, self._ref(None), f"{what} back to the base")
        exact = None
        if base_out is not None:
            exact = bool(np.array_equal(got, base_out))
            if not exact:
                raise ParityError(
                    f"{what}: switching back to the base is not bit-exact (max |diff| "
                    f"{float(np.max(np.abs(got - base_out))):.3g} against the same runtime's "
                    "output before its first switch); refusing to report its timings")
        self._row(backend, variant, self.check_in, err, check="restore", method=method,
                  mode=mode, adapter=None, bit_exact=exact)
        cycle.restore()

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
        first instance also records memory and serves the switch timings. Every case runs the
        store's forward (``rt.store.run``) on inputs checked once, outside the timed loop, as
        the unfused sessions do: each case times the model's forward alone."""
        shira, lora = self.aset.of("shira"), self.aset.of("lora")
        cases: dict[str, tuple[Callable, str | None]] = {}
        memory: list[dict] = []
        base_mode = "repack" if backend != "onnxruntime-cuda" else "live"
        if first:  # a throwaway load: the first load of a process pays one-time setup
            warm = self._load(backend, base_mode)
            del warm
            gc.collect()
        rss0 = _rss()
        base = self._load(backend, base_mode)
        memory.append({"backend": backend, "runtime": "base", "mode": base_mode,
                       "rss_delta_bytes": _rss() - rss0})
        cases["base"] = (lambda x, rt=base: rt.store.run(x), None)
        rss0 = _rss()
        live = self._load(backend, "live")
        if first:
            self.base_out["live"] = live.store.run(self.check_in)
        live.switch(shira[0])
        memory.append({"backend": backend, "runtime": "live", "rss_delta_bytes": _rss() - rss0,
                       "restore_bytes_shira": live.restore_memory_bytes()})
        cases["shira-live"] = (lambda x, rt=live: rt.store.run(x), shira[0])
        repack = None
        if backend != "onnxruntime-cuda":
            repack = self._load(backend, "repack")
            if first:
                self.base_out["repack"] = repack.store.run(self.check_in)
            repack.switch(shira[0])
            cases["shira-repack"] = (lambda x, rt=repack: rt.store.run(x), shira[0])
        elif first:
            self._skip(backend, "shira-repack", "CUDA kernels read raw weights: live only")
        lora_rt = self._load(backend, "live")
        if first:
            self.base_out["lora"] = lora_rt.store.run(self.check_in)
        lora_rt.switch(lora[0])
        memory.append({"backend": backend, "runtime": "live+lora", "restore_bytes_lora":
                       lora_rt.restore_memory_bytes()})
        cases["lora-fused"] = (lambda x, rt=lora_rt: rt.store.run(x), lora[0])
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
            # checked (names, dtypes, shapes, id range) once, outside the timed loop
            inputs = check_inputs(self.manifest.inputs, self.subject.inputs(batch, seq))
            refs: dict = {}
            for case, (fn, adapter) in cases.items():
                self._parity(backend, case, fn, adapter, inputs, refs)
            samples = time_interleaved({c: (lambda f=fn, x=inputs: f(x)) for c, (fn, _) in
                                        cases.items()}, repeats=self.opts.repeats,
                                       warmup=self.opts.warmup, progress=self.progress)
            pooled, per_round = combine_instances(samples)
            for variant, st in ((v, Stats.of(s)) for v, s in pooled.items()):
                mode = "live" if (variant, backend) == ("base", "onnxruntime-cuda") \
                    else VARIANT_MODES[variant]
                row = {"backend": backend, "variant": variant, "batch": batch, "seq": seq,
                       "runtime_mode": mode, "sessions": self.opts.sessions, **st.as_dict()}
                r = Ratio.of(per_round, variant, "base")
                row.update(ratio_vs_base=r.paired_median, ratio_vs_base_p10=r.paired_p10,
                           ratio_vs_base_p90=r.paired_p90)
                self.forward.append(row)

    # -- switch ----------------------------------------------------------------------------

    def run_switch(self, backend: str) -> None:
        """Two interleaved series, the floor's 128 MiB copy right before every timed switch
        (each switch starts from the same cold cache): the fast switches, then the slow ones
        (reload, repack switch) with the live SHiRA switch again in the same rounds. Every
        ratio is against the SHiRA switch of the same rounds; each series is checked against
        PyTorch (:meth:`_check_switch`) before any of its timings is reported."""
        shira, lora = self.aset.of("shira")[:2], self.aset.of("lora")[:2]
        fast = {"shira": _Cycle(self.rt_live.switch, shira),
                "lora-fuse": _Cycle(self.rt_lora.switch, lora)}
        peer = None
        if getattr(self, "ort_peer", None) is not None and backend == "onnxruntime-cpu":
            peer, files, peer_loras = self.ort_peer
            loaded = [peer.load(f) for f in files]
            fast["ort-adapter"] = _Cycle(peer.activate, loaded)
        samples = time_interleaved(fast, repeats=self.opts.switch_repeats,
                                   warmup=self.opts.warmup, progress=self.progress,
                                   flush=self.copy_probe)
        self._check_switch(backend, "shira", "live", "shira-live", fast["shira"], shira,
                           self.rt_live.store.run, lambda: self.rt_live.switch(None),
                           self.base_out["live"])
        self._check_switch(backend, "lora-fuse", "live", "lora-fused", fast["lora-fuse"], lora,
                           self.rt_lora.store.run, lambda: self.rt_lora.switch(None),
                           self.base_out["lora"])
        if peer is not None:  # no exact restore to check: the base is the graph's zero branch
            self._check_switch(backend, "ort-adapter", "unfused", "ort-lora-adapter",
                               fast["ort-adapter"], peer_loras, peer.run,
                               lambda: peer.activate(None), None)
        live_buffers = self.rt_live.store.live_weights()
        layouts = {n: lw.layout for n, lw in live_buffers.items()}
        offsets = {n: int(lw.array.ctypes.data) % fl.CACHE_LINE
                   for n, lw in live_buffers.items()}
        self.floor_rounds[backend] = (
            samples["shira"], self.copy_probe.bandwidth(samples[flush_key("shira")]), layouts,
            offsets)
        modes = {"shira": "live", "lora-fuse": "live", "ort-adapter": "unfused"}
        for method in fast:
            self._switch_row(backend, method, modes[method], samples, method)
        self.memory.append({"backend": backend, "runtime": "live after switches",
                            "restore_bytes_shira": self.rt_live.restore_memory_bytes(),
                            "plan_cache_bytes_shira": self.rt_live.plan_cache_bytes(),
                            # ExecuTorch: live buffers moved to huge pages at load (pages.py)
                            "collapsed_bytes": getattr(self.rt_live.store, "collapsed_bytes",
                                                       None),
                            "restore_bytes_lora": self.rt_lora.restore_memory_bytes()})
        reload_mode = "live" if BACKEND_SPECS[backend][1] == "cuda" else "repack"
        slow = {"shira": fast["shira"], "reload": self._reload_case(backend, reload_mode)}
        if self.rt_repack is not None:
            slow["shira-repack"] = _Cycle(self.rt_repack.switch, shira)
        samples = time_interleaved(slow, repeats=self.opts.reload_repeats, warmup=1,
                                   progress=self.progress, flush=self.copy_probe)
        if self.rt_repack is not None:
            self._check_switch(backend, "shira", "repack", "shira-repack",
                               slow["shira-repack"], shira, self.rt_repack.store.run,
                               lambda: self.rt_repack.switch(None), self.base_out["repack"])
        self._check_reload(backend, reload_mode)
        self._switch_row(backend, "reload", reload_mode, samples, "reload")
        if "shira-repack" in samples:
            self._switch_row(backend, "shira", "repack", samples, "shira-repack")

    def _reload_case(self, backend: str, mode: str) -> Callable[[], None]:
        def reload() -> None:
            rt = self._reload(backend, mode)
            del rt
        return reload

    def _reload(self, backend: str, mode: str):
        from edgeadapt.runtime import load

        name, device = BACKEND_SPECS[backend]
        return load(self.bundle, backend=name, device=device, mode=mode,
                    threads=self.opts.threads, verify_base=False)

    def _check_reload(self, backend: str, mode: str) -> None:
        """A reloaded runtime (what the timed reload builds) against the base reference."""
        rt = self._reload(backend, mode)
        err = check_parity(rt.store.run(self.check_in), self._ref(None),
                           f"{backend} reload ({mode})")
        self._row(backend, "base", self.check_in, err, check="reload", method="reload",
                  mode=mode, adapter=None)
        del rt
        gc.collect()

    def _switch_row(self, backend: str, method: str, mode: str,
                    samples: dict[str, list[float]], case: str) -> None:
        """The row of ``samples[case]``; ``ratio_vs_shira`` (p10, p90) = median over rounds of
        case / the live SHiRA switch timed in the same round (``samples["shira"]``)."""
        r = Ratio.of(samples, case, "shira")
        row = {"backend": backend, "method": method, "mode": mode,
               **Stats.of(samples[case]).as_dict(), "ratio_vs_shira": r.paired_median,
               "ratio_vs_shira_p10": r.paired_p10, "ratio_vs_shira_p90": r.paired_p90}
        if case != "shira":  # the SHiRA switch it was paired with, from the same rounds
            row["shira_same_rounds_p50_ms"] = Stats.of(samples["shira"]).p50_ms
        self.switch.append(row)

    def run_peers(self) -> None:
        from edgeadapt.bench.peers import (
            merged_weights,
            peft_lora_model,
            peft_shira_model,
            peft_switcher,
            reference_weights,
        )
        from edgeadapt.bench.reference import rel_error

        lm = getattr(self.subject, "lm", None)
        if lm is None:
            self._skip("pytorch", "peft peers", "the subject has no PyTorch model")
            return
        for method, build, method_of in (("peft-shira-merge", peft_shira_model, "shira"),
                                         ("peft-lora-merge", peft_lora_model, "lora")):
            ad_names = self.aset.of(method_of)[:2]
            ads = [self.aset.adapters[n] for n in ad_names]
            pm, _ = build(lm.model, ads)
            switch = peft_switcher(pm, ["a0", "a1"])
            s = time_interleaved({method: switch}, repeats=self.opts.switch_repeats,
                                 warmup=self.opts.warmup, progress=self.progress)
            # merged weights against W0 + delta from apply_adapter_torch, then W0 after the
            # unmerge, before the timings are reported
            names = sorted(ads[0].targets)
            for label, ad, ad_name in (("a0", ads[0], ad_names[0]),
                                       ("a1", ads[1], ad_names[1]), (None, None, None)):
                switch.to(label)
                want = reference_weights(lm.model, ad, names)
                got = merged_weights(pm, names)
                err = max(rel_error(got[n], want[n]) for n in names)
                what = f"pytorch {method} " + (f"merge of {ad_name}" if ad is not None
                                               else "unmerge")
                if not err <= PEFT_WEIGHT_TOL:
                    raise ParityError(f"{what}: merged weights differ from W0 + delta computed "
                                      f"independently (max rel error {err:.3g} > "
                                      f"{PEFT_WEIGHT_TOL:g}); refusing to report its timings")
                self.parity.append({"backend": "pytorch", "variant": method, "instance": 0,
                                    "batch": None, "seq": None, "max_rel_error": err,
                                    "check": "merge" if ad is not None else "unmerge",
                                    "method": method, "mode": "merge",
                                    "adapter": ad_name, "compared": "weights"})
            self.switch.append({"backend": "pytorch", "method": method, "mode": "merge",
                                **Stats.of(s[method]).as_dict()})
            del pm, switch
            gc.collect()

    # -- floor -----------------------------------------------------------------------------

    def floor(self) -> dict:
        """The floor of the timed SHiRA switch: the traffic (edgeadapt.bench.floor) in the
        layouts the backend's live buffers really have (ONNX ``blocked32`` / ``transposed``,
        ExecuTorch ``as-is``), counted from the buffers' real addresses (their offset past a
        cache line), over the copy bandwidth timed right before each switch of the same
        rounds, per backend (``per_backend``). The top level is the first timed backend's (the
        ONNX layouts and a standalone bandwidth measurement when no backend timed a switch)."""
        a, b = (self.aset.adapters[n] for n in self.aset.of("shira")[:2])
        shapes = {n: tuple(w.shape) for n, w in self.manifest.weights.items()}

        def traffic(layouts: dict[str, str], offsets: dict[str, int] | None = None
                    ) -> fl.SwitchTraffic:
            return fl.switch_traffic({n: d.indices for n, d in a.targets.items()},
                                     {n: d.indices for n, d in b.targets.items()}, shapes,
                                     layouts=layouts, offsets=offsets)

        traffics = {be: traffic(layouts, offsets)
                    for be, (_, _, layouts, offsets) in self.floor_rounds.items()}
        per_backend = {be: {**fl.floor_ratios(sw, bw, traffics[be]), **traffics[be].as_dict(),
                            "layouts": sorted(set(layouts.values())),
                            "buffer_offsets": sorted(set(offsets.values()))}
                       for be, (sw, bw, layouts, offsets) in self.floor_rounds.items()}
        if self.floor_rounds:
            first, (_, bws, _, _) = next(iter(self.floor_rounds.items()))
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


def gpu_name() -> str | None:
    """The GPU's name (torch, else nvidia-smi), or None where neither can tell."""
    try:
        import torch

        if torch.cuda.is_available():
            return str(torch.cuda.get_device_name(0))
    except Exception:  # noqa: BLE001 - a GPU name is informational only
        pass
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


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
    Backends that are unavailable here (no package, no GPU, no section of the bundle for them:
    :func:`unavailable`, or MissingPackageError while loading) are listed under ``skipped``;
    anything wrong with the bundle raises (BundleError naming the file for a corrupt model).
    """
    bundle = Path(bundle_dir)
    manifest: Manifest = read_manifest(bundle)
    if not opts.backends:
        raise ConfigError(f"no backends to measure: choose from {', '.join(BACKEND_SPECS)}")
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
        ran: list[str] = []
        for backend in opts.backends:
            reason = unavailable(backend, manifest)
            if reason is not None:
                run._skip(backend, "all", reason)
                continue
            try:
                cases = run._forward_cases(backend)
            except MissingPackageError as exc:  # unavailable here (a package, the GPU)
                run._skip(backend, "all", f"{type(exc).__name__}: {exc}")
                run.rt_live = run.rt_repack = run.rt_lora = run.ort_peer = None
                gc.collect()
                continue
            except onnx_load_errors() as exc:
                raise BundleError(f"{bundle / (manifest.onnx or {}).get('file', '?')}: not a "
                                  f"readable ONNX model ({type(exc).__name__}: {exc})") from exc
            ran.append(backend)
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
    extra = {"gpu": gpu_name()} if any(BACKEND_SPECS[b][1] == "cuda" for b in ran) else {}
    return {"model": manifest.model, "device": device_name(), **extra, "targets_spec":
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
