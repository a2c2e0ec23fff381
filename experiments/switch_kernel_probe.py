"""Ways to write a SHiRA switch, against its memory-traffic floor (docs/bench.md, runs 4-5):

    .venv/bin/python -m experiments.switch_kernel_probe [--rounds 60] [--warm]
    .venv/bin/python -m experiments.switch_kernel_probe --in-bench BUNDLE \
        [--backend onnxruntime|executorch] [--in-bench-rounds 2]
    .venv/bin/python -m experiments.switch_kernel_probe --ab-span BUNDLE \
        [--backend onnxruntime|executorch] [--rounds 60] [--with-lora]
    .venv/bin/python -m experiments.switch_kernel_probe --ab-threads BUNDLE \
        [--backend onnxruntime|executorch] [--rounds 60]

60 float32 buffers shaped like SmolLM2's q/v live weights (30 x (576, 576) and (576, 192), 53 MB),
two random 1% SHiRA adapters, the union of their positions per buffer (a full switch writes it).
Cases, timed interleaved with a 128 MiB ``numpy.copyto`` (the floor's bandwidth), the cache
evicted before every case unless ``--warm``:

- ``numpy``: ``flat[union] = values`` per buffer (what the engine does where the live buffers
  are not in one block of memory);
- ``numpy int32``: the same with int32 positions;
- ``C`` / ``C prefetch D``: a plain C loop (gcc -O3, through ctypes; skipped without gcc),
  with ``__builtin_prefetch`` D positions ahead;
- ``huge pages``: numpy on buffers carved from one 2 MB-aligned ``MADV_HUGEPAGE`` arena;
- ``2 threads``: numpy, each thread half of every buffer's positions (against a 2-thread copy).

Prints each case's median and its ratio to the floor at the median copy bandwidth.

``--in-bench BUNDLE``: the benchmark's own switch timing and paired floor (``run_bench`` on
``--backend``, shape 1x1, 2 forward repeats, 30 switch repeats, no peers, one thread), for each
way of writing a cached switch: the engine as is (one numpy scatter over the span of all live
buffers, ``pages.one_span``), numpy per buffer (the span disabled), and the C loop per buffer
without and with prefetch 64 ahead; the cases alternate, ``--in-bench-rounds`` times each.

``--ab-span BUNDLE``: one live runtime of the bundle, two synthetic 1% SHiRA adapters (the
benchmark's), the cached switch between them timed ``--rounds`` times each way, alternating:
one scatter over the span (the engine) and one scatter per buffer (the same cached plans with
the span's arrays set aside); each switch after the floor's 128 MiB copy, which evicts the cache
and times the bandwidth. Prints both medians, the median of the per-round ratios, and the
paired floor ratio of each. ``--with-lora``: as the benchmark's switch rounds instead: three
live runtimes (one scatter, one per buffer, and one fusing two synthetic rank-16 LoRAs) and the
copy, rotated by ``time_interleaved``; prints the medians and the median per-round ratio.

``--ab-threads BUNDLE``: as ``--ab-span``, the engine's one scatter on one thread against two
(``SwitchEngine.write_threads``), alternating, each after the copy.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from edgeadapt.bench import floor as fl
from edgeadapt.timer import flush_key, time_interleaved

C_SOURCE = r"""
#include <stddef.h>
#include <stdint.h>
void scatter(float *dst, const int64_t *idx, const float *val, size_t n, size_t ahead) {
    size_t i = 0;
    if (ahead)
        for (; i + ahead < n; i++) {
            __builtin_prefetch(&dst[idx[i + ahead]], 1, 3);
            dst[idx[i]] = val[i];
        }
    for (; i < n; i++) dst[idx[i]] = val[i];
}
"""


def _c_scatter():
    if shutil.which("gcc") is None:
        return None
    tmp = Path(tempfile.mkdtemp())
    (tmp / "s.c").write_text(C_SOURCE)
    subprocess.run(["gcc", "-O3", "-shared", "-fPIC", "-o", str(tmp / "s.so"), str(tmp / "s.c")],
                   check=True)
    fn = ctypes.CDLL(str(tmp / "s.so")).scatter
    fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_size_t] * 2
    return fn


def _huge_arena(sizes: list[int]) -> tuple[mmap.mmap, list[np.ndarray]]:
    total, align = sum(sizes) * 4, 2 << 20
    mm = mmap.mmap(-1, total + align)
    mm.madvise(mmap.MADV_HUGEPAGE)
    raw = np.frombuffer(mm, dtype=np.uint8)
    off = (-raw.ctypes.data) % align
    flat = raw[off:off + total].view(np.float32)
    out, at = [], 0
    for n in sizes:
        out.append(flat[at:at + n])
        at += n
    return mm, out


def in_bench(bundle: str, backend: str, rounds: int) -> None:
    from edgeadapt.bench.options import BenchOptions
    from edgeadapt.bench.run import run_bench
    from edgeadapt.runtime import engine

    c_fn = _c_scatter()
    engine_write, engine_span = engine.SwitchEngine._write, engine.one_span

    def no_span(arrays):
        return None

    def c_write(ahead):
        def _write(self, sw):
            undo = {}
            for name, plan in sw.plans.items():
                if plan.full is None:
                    flat, u, v = self._flat[name], plan.union, plan.vals
                    c_fn(flat.ctypes.data, u.ctypes.data, v.ctypes.data, u.size, ahead)
                else:
                    undo[name] = self.live[name].array.copy()
                    np.copyto(self.live[name].array, plan.full)
            return undo
        return _write

    opts = BenchOptions(backends=[backend], shapes=[(1, 1)], repeats=2, switch_repeats=30,
                        reload_repeats=1, peers=False, threads=1)
    cases = {"numpy, one scatter over the span (the engine)": (engine_write, engine_span),
             "numpy, per buffer": (engine_write, no_span)}
    if c_fn is not None:
        cases.update({"C, per buffer": (c_write(0), no_span),
                      "C prefetch 64, per buffer": (c_write(64), no_span)})
    try:
        for r in range(rounds):
            for label, (write, span) in cases.items():
                engine.SwitchEngine._write, engine.one_span = write, span
                rep = run_bench(bundle, opts)
                sw = next(x["p50_ms"] for x in rep["switch"]
                          if (x["method"], x["mode"]) == ("shira", "live"))
                fl_ = rep["floor"]["per_backend"][f"{backend}:cpu"]
                print(f"round {r}, {label}: switch p50 {sw:.3f} ms, copy "
                      f"{fl_['bandwidth_GBps']:.1f} GB/s, switch / floor "
                      f"{fl_['measured_over_floor']:.3f} (paired)", flush=True)
    finally:
        engine.SwitchEngine._write, engine.one_span = engine_write, engine_span


def _live(bundle: str, backend: str):
    """A live runtime of ``bundle`` on one thread on the CPU."""
    from edgeadapt.runtime import load

    return load(bundle, backend=backend, mode="live", threads=1)


def _shapes_sha(manifest) -> tuple[dict, dict]:
    """(weight -> (out, in), weight -> base sha256): what the synthetic adapters need."""
    return ({n: tuple(w.shape) for n, w in manifest.weights.items()},
            {n: w.sha256 for n, w in manifest.weights.items()})


def _ratio_line(label: str, num: list[float], den: list[float], rounds: int) -> str:
    r = np.array(num) / np.array(den)
    return (f"{label}, median of {rounds} rounds: {np.median(r):.3f} "
            f"(p10 {np.percentile(r, 10):.3f}, p90 {np.percentile(r, 90):.3f})")


def ab_span_with_lora(bundle: str, backend: str, rounds: int) -> None:
    from edgeadapt.bench.synth import synth_lora, synth_shira

    rts = {k: _live(bundle, backend) for k in ("span", "per", "lora")}
    rts["per"].engine._span = None  # before any plan is cached: one scatter per buffer
    shapes, sha = _shapes_sha(rts["span"].manifest)

    def cycle(rt, adapters):
        preps = [rt.engine.prepare(ad, f"a{i}") for i, ad in enumerate(adapters)]
        state = [0]

        def call() -> None:
            state[0] ^= 1
            rt.engine.switch([(preps[state[0]], 1.0)])
        return call

    shira = [synth_shira(shapes, sha, seed=s) for s in (1, 2)]
    lora = [synth_lora(shapes, sha, seed=s) for s in (3, 4)]
    samples = time_interleaved({"one scatter": cycle(rts["span"], shira),
                                "per buffer": cycle(rts["per"], shira),
                                "lora fuse": cycle(rts["lora"], lora), "copy": fl.CopyProbe()},
                               repeats=rounds, warmup=3)
    for case, ts in samples.items():
        print(f"{case}: median {np.median(ts):.3f} ms")
    print(_ratio_line("one scatter / per buffer", samples["one scatter"],
                      samples["per buffer"], rounds))


def ab_span(bundle: str, backend: str, rounds: int) -> None:
    from edgeadapt.bench.synth import synth_shira

    rt = _live(bundle, backend)
    eng = rt.engine
    if eng._span is None:
        raise SystemExit("the live buffers of this bundle are not in one span")
    shapes, sha = _shapes_sha(rt.manifest)
    ads = [synth_shira(shapes, sha, seed=s) for s in (1, 2)]
    a, b = (eng.prepare(ad, f"s{i}") for i, ad in enumerate(ads))
    for x in (a, b, a):  # a <-> b is now a cached pair
        eng.switch([(x, 1.0)])
    pair = eng._pairs[-1]
    scatters = (pair.to_b.scatter, pair.to_a.scatter)
    probe = fl.CopyProbe()
    state = [0]

    def switch(span: bool):
        def call() -> None:
            pair.to_b.scatter, pair.to_a.scatter = scatters if span else (None, None)
            state[0] ^= 1
            eng.switch([(b if state[0] else a, 1.0)])
        return call

    samples = time_interleaved({"span": switch(True), "per buffer": switch(False)},
                               repeats=rounds, warmup=0, flush=probe)
    times = {case: samples[case] for case in ("span", "per buffer")}
    copies = {case: samples[flush_key(case)] for case in times}
    pair.to_b.scatter, pair.to_a.scatter = scatters
    traffic = fl.switch_traffic(
        *({n: d.indices for n, d in ad.targets.items()} for ad in ads), shapes,
        layouts={n: lw.layout for n, lw in eng.live.items()})
    for case, ts in times.items():
        ratio = fl.floor_ratios(ts, probe.bandwidth(copies[case]), traffic)
        print(f"{case}: switch median {np.median(ts):.3f} ms, switch / floor (paired) "
              f"{ratio['measured_over_floor']:.3f}")
    print(_ratio_line("span / per buffer", times["span"], times["per buffer"], rounds))


def ab_threads(bundle: str, backend: str, rounds: int) -> None:
    from edgeadapt.bench.synth import synth_shira

    rt = _live(bundle, backend)
    eng = rt.engine
    shapes, sha = _shapes_sha(rt.manifest)
    ads = [synth_shira(shapes, sha, seed=s) for s in (1, 2)]
    a, b = (eng.prepare(ad, f"s{i}") for i, ad in enumerate(ads))
    for x in (a, b, a):  # a <-> b is now a cached pair
        eng.switch([(x, 1.0)])
    probe = fl.CopyProbe()
    state = [0]

    def switch(threads: int):
        def call() -> None:
            eng.write_threads = threads
            state[0] ^= 1
            eng.switch([(b if state[0] else a, 1.0)])
        return call

    cases = {"1 thread": switch(1), "2 threads": switch(2)}
    samples = time_interleaved(cases, repeats=rounds, warmup=0, flush=probe)
    traffic = fl.switch_traffic(
        *({n: d.indices for n, d in ad.targets.items()} for ad in ads), shapes,
        layouts={n: lw.layout for n, lw in eng.live.items()})
    for case in cases:
        ts = samples[case]
        ratio = fl.floor_ratios(ts, probe.bandwidth(samples[flush_key(case)]), traffic)
        print(f"{case}: switch median {np.median(ts):.3f} ms, switch / floor (paired) "
              f"{ratio['measured_over_floor']:.3f}")
    print(_ratio_line("2 threads / 1 thread", samples["2 threads"], samples["1 thread"], rounds))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--warm", action="store_true", help="do not evict the cache between cases")
    ap.add_argument("--in-bench", metavar="BUNDLE", default=None,
                    help="time the switch inside run_bench on BUNDLE instead")
    ap.add_argument("--backend", default="onnxruntime",
                    choices=["onnxruntime", "executorch"],
                    help="with --in-bench / --ab-span / --ab-threads (on the CPU)")
    ap.add_argument("--in-bench-rounds", type=int, default=1, help="with --in-bench")
    ap.add_argument("--ab-span", metavar="BUNDLE", default=None,
                    help="A/B the engine's one scatter over the span against one per buffer")
    ap.add_argument("--ab-threads", metavar="BUNDLE", default=None,
                    help="A/B the engine's scatter on one thread against two")
    ap.add_argument("--with-lora", action="store_true",
                    help="with --ab-span: rounds as the benchmark's (LoRA fuses, copies)")
    args = ap.parse_args()
    if args.ab_span:
        (ab_span_with_lora if args.with_lora else ab_span)(args.ab_span, args.backend,
                                                           args.rounds)
        return
    if args.ab_threads:
        ab_threads(args.ab_threads, args.backend, args.rounds)
        return
    if args.in_bench:
        in_bench(args.in_bench, args.backend, args.in_bench_rounds)
        return
    rng = np.random.default_rng(0)
    sizes = [576 * 576, 576 * 192] * 30
    plain = [np.ones(n, np.float32) for n in sizes]
    _keep, huge = _huge_arena(sizes)
    for h in huge:
        h[:] = 1.0
    a = [np.sort(rng.choice(n, n // 100, replace=False)) for n in sizes]
    b = [np.sort(rng.choice(n, n // 100, replace=False)) for n in sizes]
    union = [np.union1d(x, y) for x, y in zip(a, b, strict=True)]
    union32 = [u.astype(np.int32) for u in union]
    values = [[rng.standard_normal(u.size).astype(np.float32) for u in union] for _ in range(2)]
    lines = sum(fl.touched_lines(u, 4) for u in union)
    stream = sum((x.size + y.size) * 8 + y.size * 4 + u.size * 4
                 for x, y, u in zip(a, b, union, strict=True))
    traffic = fl.SwitchTraffic(lines, 2 * fl.CACHE_LINE * lines, stream, 0)
    probe = fl.CopyProbe()
    pool = ThreadPoolExecutor(2)
    half = probe.src.size // 2
    c_fn = _c_scatter()
    state = {"r": 0}

    def numpy_write(bufs, idx):
        for w, u, v in zip(bufs, idx, values[state["r"] % 2], strict=True):
            w[u] = v

    def c_write(ahead):
        for w, u, v in zip(plain, union, values[state["r"] % 2], strict=True):
            c_fn(w.ctypes.data, u.ctypes.data, v.ctypes.data, u.size, ahead)

    def two_threads():
        def part(k):
            for w, u, v in zip(plain, union, values[state["r"] % 2], strict=True):
                m = u.size // 2
                s = slice(0, m) if k == 0 else slice(m, None)
                w[u[s]] = v[s]
        f = pool.submit(part, 0)
        part(1)
        f.result()

    def copy2():
        f = pool.submit(np.copyto, probe.dst[:half], probe.src[:half])
        np.copyto(probe.dst[half:], probe.src[half:])
        f.result()

    cases = {"copy": probe, "copy 2 threads": copy2,
             "numpy": lambda: numpy_write(plain, union),
             "numpy int32": lambda: numpy_write(plain, union32),
             "huge pages": lambda: numpy_write(huge, union), "2 threads": two_threads}
    if c_fn is not None:
        cases["C"] = lambda: c_write(0)
        for ahead in (8, 32, 64):
            cases[f"C prefetch {ahead}"] = lambda d=ahead: c_write(d)
    evict = (np.ones(64 << 20, np.float32), np.empty(64 << 20, np.float32))
    names = list(cases)

    def per_round(fn):  # the i-th call writes value set i % 2, as round i did
        calls = [0]

        def call() -> None:
            state["r"] = calls[0]
            calls[0] += 1
            fn()
        return call

    samples = time_interleaved({n: per_round(f) for n, f in cases.items()},
                               repeats=args.rounds, warmup=0,
                               flush=None if args.warm else lambda: np.copyto(evict[1], evict[0]))
    floors = {}
    for name, key in (("copy", "1 thread"), ("copy 2 threads", "2 threads")):
        bw = float(np.median(probe.bandwidth(samples[name])))
        floors[key] = fl.floor_ms(traffic, bw)
        print(f"floor ({key} copy, {bw / 1e9:.1f} GB/s): {floors[key]:.3f} ms "
              f"({traffic.total_bytes} bytes, {lines} cache lines)")
    for name in names[2:]:
        t = float(np.median(samples[name]))
        ref = floors["2 threads" if name == "2 threads" else "1 thread"]
        print(f"{name}: {t:.3f} ms, {t / ref:.2f} x floor")


if __name__ == "__main__":
    main()
