"""Ways to write a SHiRA switch, against its memory-traffic floor (docs/bench.md, runs 4-5):

    PYTHONPATH=. .venv/bin/python scripts/switch_kernel_probe.py [--rounds 60] [--warm]
    PYTHONPATH=. .venv/bin/python scripts/switch_kernel_probe.py --in-bench BUNDLE

60 float32 buffers shaped like SmolLM2's q/v live weights (30 x (576, 576) and (576, 192), 53 MB),
two random 1% SHiRA adapters, the union of their positions per buffer (a full switch writes it).
Cases, timed interleaved with a 128 MiB ``numpy.copyto`` (the floor's bandwidth), the cache
evicted before every case unless ``--warm``:

- ``numpy``: ``flat[union] = values`` per buffer (what the engine does);
- ``numpy int32``: the same with int32 positions;
- ``C`` / ``C prefetch D``: a plain C loop (gcc -O3, through ctypes; skipped without gcc),
  with ``__builtin_prefetch`` D positions ahead;
- ``huge pages``: numpy on buffers carved from one 2 MB-aligned ``MADV_HUGEPAGE`` arena;
- ``2 threads``: numpy, each thread half of every buffer's positions (against a 2-thread copy).

Prints each case's median and its ratio to the floor at the median copy bandwidth.

``--in-bench BUNDLE``: the benchmark's own switch timing and paired floor
(``run_bench`` on ONNX Runtime CPU, shape 1x1, 2 forward repeats, 30 switch repeats, no peers),
run three times: with the engine's scatter as is (numpy), and with it replaced by the C loop
without and with prefetch 64 ahead.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from edgeadapt.bench import floor as fl

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


def in_bench(bundle: str) -> None:
    from edgeadapt.bench.run import BenchOptions, run_bench
    from edgeadapt.runtime import engine

    c_fn = _c_scatter()
    numpy_write = engine.SwitchEngine._write

    def c_write(ahead):
        def _write(self, plans):
            undo = {}
            for name, plan in plans.items():
                if plan.full is None:
                    flat, u, v = self._flat[name], plan.union, plan.vals
                    c_fn(flat.ctypes.data, u.ctypes.data, v.ctypes.data, u.size, ahead)
                else:
                    undo[name] = self.live[name].array.copy()
                    np.copyto(self.live[name].array, plan.full)
            return undo
        return _write

    opts = BenchOptions(backends=["onnxruntime-cpu"], shapes=[(1, 1)], repeats=2,
                        switch_repeats=30, reload_repeats=1, peers=False)
    writers = {"numpy": numpy_write}
    if c_fn is not None:
        writers.update({"C": c_write(0), "C prefetch 64": c_write(64)})
    try:
        for label, write in writers.items():
            engine.SwitchEngine._write = write
            rep = run_bench(bundle, opts)
            sw = next(r["p50_ms"] for r in rep["switch"]
                      if (r["method"], r["mode"]) == ("shira", "live"))
            fl_ = rep["floor"]["per_backend"]["onnxruntime-cpu"]
            print(f"{label}: switch p50 {sw:.3f} ms, copy {fl_['bandwidth_GBps']:.1f} GB/s, "
                  f"switch / floor {fl_['measured_over_floor']:.2f} (paired)")
    finally:
        engine.SwitchEngine._write = numpy_write


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--warm", action="store_true", help="do not evict the cache between cases")
    ap.add_argument("--in-bench", metavar="BUNDLE", default=None,
                    help="time the switch inside run_bench on BUNDLE instead")
    args = ap.parse_args()
    if args.in_bench:
        in_bench(args.in_bench)
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
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        state["r"] = r
        k = r % len(names)
        for name in names[k:] + names[:k]:
            if not args.warm:
                np.copyto(evict[1], evict[0])
            t0 = time.perf_counter()
            cases[name]()
            samples[name].append((time.perf_counter() - t0) * 1e3)
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
