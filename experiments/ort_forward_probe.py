"""Probes of ONNX Runtime CPU's live-vs-base forward ratio (docs/bench.md, "Forward, ONNX
Runtime"), on a bundle from ``python -m edgeadapt.bench.prepare`` (``matmul`` needs none):

    .venv/bin/python -m experiments.ort_forward_probe sessions BUNDLE 8x64 --k 3 \
        [--modes base,live,matmul] [--threads 1]
    .venv/bin/python -m experiments.ort_forward_probe output BUNDLE 8x64
    .venv/bin/python -m experiments.ort_forward_probe profile BUNDLE 1x1
    .venv/bin/python -m experiments.ort_forward_probe matmul - 1x1,1x8,1x64

``sessions``: K base (repack: every weight packed) and K live sessions in one process (live as
loaded by default, and with ``--modes`` also ``matmul``: live without edgeadapt's kernel), timed
interleaved; each session's median and mode/base over every session pair, to tell a mode's cost
from one session's luck. ``output``: one live session returning its logits four ways
(the runtime's ``run``, the OrtValue's numpy view, a preallocated buffer, the OrtValue kept)
against the base, to price the output copy. ``profile``: ONNX Runtime's own profiler on a base
and a live session, kernel time summed over the MatMuls that read a live weight and over all
other nodes. ``matmul``: no model; a chain of 60 MatMuls with distinct (576, 576) weights
(SmolLM2's q shape, 80 MB: out of cache), the weights constant and prepacked, constant with
prepacking disabled, graph inputs (live, ``(in, out)``), graph inputs used as the *A* operand
(``(W @ x^T)^T``; MLAS packs only B), or graph inputs in the exporter's ``blocked32`` layout
(its own rewrite), each run after a 256 MiB copy evicts the cache. ``--extra blocks``
adds the same blocked rewrite with blocks of 64-288 columns (why 32); ``--extra blocked-as-a``
adds the blocked32 buffer read as the *A* operand through ONNX Runtime's ``FusedMatMul``
(``transA=1``: per block ``(32, in) @ x^T``), the one way one buffer could serve both forms;
``--extra kernel`` adds the blocked32 buffers read by edgeadapt's own kernel
(``edgeadapt.BlockedMatMul``, :mod:`edgeadapt.runtime.backends.onnxruntime.kernel`), as live
sessions read them where it builds.
"""

from __future__ import annotations

import argparse

import numpy as np

from edgeadapt.runtime import load
from edgeadapt.timer import time_interleaved


def _inputs(rt, shape: str) -> dict[str, np.ndarray]:
    """Random token ids, every other model input (attention mask) all ones."""
    b, s = (int(v) for v in shape.split("x"))
    ids = np.random.default_rng(0).integers(0, 1000, (b, s)).astype(np.int64)
    return {i["name"]: ids if i["name"] == "input_ids" else np.ones((b, s), np.int64)
            for i in rt.manifest.inputs}


def _load(bundle: str, mode: str, threads: int = 1):
    """base: every weight packed (repack); live: live mode as loaded by default (edgeadapt's
    kernel where it builds); matmul: live mode read through MatMul (kernel=False)."""
    return load(bundle, backend="onnxruntime", mode="repack" if mode == "base" else "live",
                threads=threads, verify_base=False, kernel=False if mode == "matmul" else None)


def sessions(bundle: str, shape: str, k: int, repeats: int, modes: str = "base,live",
             threads: int = 1) -> None:
    names = modes.split(",")
    rts = {f"{m}{i}": _load(bundle, m, threads) for i in range(k) for m in names}
    x = _inputs(rts[f"{names[0]}0"], shape)
    samples = time_interleaved({n: (lambda r=r: r.run(**x)) for n, r in rts.items()},
                               repeats=repeats, warmup=3)
    med = {n: float(np.median(v)) for n, v in samples.items()}
    for n in sorted(med):
        print(f"{n} {med[n]:.3f} ms ({rts[n].live_form if rts[n].mode == 'live' else 'packed'})")
    bases = [med[f"base{i}"] for i in range(k)]
    for m in names[1:]:
        lives = [med[f"{m}{i}"] for i in range(k)]
        print(f"{m}/base, median of session medians: {np.median(lives) / np.median(bases):.3f};"
              " every pair:", sorted(round(lv / bv, 3) for lv in lives for bv in bases))


def output(bundle: str, shape: str, repeats: int) -> None:
    live, base = _load(bundle, "live"), _load(bundle, "repack")
    x = _inputs(live, shape)
    store = live.engine.store
    binding = store._binding()
    out_shape = live.run(**x).shape
    buf = np.empty(out_shape, np.float32)

    def bound(**out):
        for name, value in x.items():
            binding.bind_cpu_input(name, value)
        binding.bind_output(store.output_name, "cpu", **out)
        store.session.run_with_iobinding(binding)

    def view():
        bound()
        result = binding.get_outputs()[0].numpy()
        binding.clear_binding_outputs()
        return result

    def prealloc():
        bound(element_type=np.float32, shape=list(out_shape), buffer_ptr=buf.ctypes.data)
        return buf

    def copy():
        bound()
        result = binding.copy_outputs_to_cpu()[0]
        binding.clear_binding_outputs()
        return result

    cases = {"base": lambda: base.run(**x), "live (runtime run)": lambda: live.run(**x),
             "live, copy_outputs_to_cpu": copy, "live, OrtValue view": view,
             "live, preallocated output": prealloc}
    samples = time_interleaved(cases, repeats=repeats, warmup=2)
    ref = float(np.median(samples["base"]))
    for name, v in samples.items():
        print(f"{name}: {np.median(v):.2f} ms, {np.median(v) / ref:.3f} x base")


def profile(bundle: str, shape: str, repeats: int) -> None:
    import json
    import tempfile

    import onnx
    import onnxruntime as ort

    from edgeadapt.runtime.backends.onnxruntime.session import (
        add_constant_initializers,
        session_options,
    )

    live, base = _load(bundle, "live"), _load(bundle, "repack")
    x = _inputs(live, shape)
    graph = onnx.load(str(live.engine.store.model_path), load_external_data=False).graph
    live_inputs = set(live.engine.store.graph_names.values())
    on_live = {n.name for n in graph.node
               if n.op_type in ("MatMul", "Gemm") and set(n.input) & live_inputs}
    totals = {}
    alive: dict[str, list] = {}  # OrtValues the constant session reads
    with tempfile.TemporaryDirectory() as tmp:
        for mode, rt in (("base", base), ("live", live)):
            store = rt.engine.store
            so = session_options(1)
            so.enable_profiling = True
            so.profile_file_prefix = f"{tmp}/{mode}"
            if mode == "base":
                so.add_session_config_entry(
                    "session.model_external_initializers_file_folder_path",
                    str(store.model_path.parent))
                alive[mode] = add_constant_initializers(  # the repack store's constants
                    so, {store.graph_names[n]: lw.array
                         for n, lw in store.live_weights().items()}, store._renamed)
                sess = ort.InferenceSession(store._proto, so, providers=["CPUExecutionProvider"])
                feeds = dict(x)
            else:
                sess = ort.InferenceSession(str(store.model_path), so,
                                            providers=["CPUExecutionProvider"])
                feeds = {**x, **{store.graph_names[n]: lw.array
                                 for n, lw in store.live_weights().items()}}
            for _ in range(repeats):
                sess.run(None, feeds)
            with open(sess.end_profiling()) as f:
                events = json.load(f)
            kern = [e for e in events if e.get("cat") == "Node" and
                    e["name"].endswith("_kernel_time")]
            qv = sum(e["dur"] for e in kern if e["name"][:-len("_kernel_time")] in on_live)
            rest = sum(e["dur"] for e in kern) - qv
            totals[mode] = (qv / repeats / 1e3, rest / repeats / 1e3)
    for mode, (qv, rest) in totals.items():
        print(f"{mode}: MatMuls on live weights {qv:.2f} ms, all other nodes {rest:.2f} ms "
              f"per run ({len(on_live)} MatMuls)")
    (bq, br), (lq, lr) = totals["base"], totals["live"]
    print(f"live - base: live-weight MatMuls {lq - bq:+.2f} ms, other nodes {lr - br:+.2f} ms")


KERNEL = "live, blocked32, own kernel"


def _b32_inputs(kind: str) -> bool:
    """Whether the chain of ``kind`` reads its weights as the exporter's ``.B32`` inputs."""
    return kind in ("live, blocked32", KERNEL)


def _blocked(w_in_out: np.ndarray, block: int) -> np.ndarray:
    """(in, out) -> (out / block, in, block), X[b, c, j] = W[block * b + j, c]."""
    inp, out = w_in_out.shape
    return np.ascontiguousarray(w_in_out.reshape(inp, out // block, block).transpose(1, 0, 2))


def matmul(shapes: str, repeats: int, layers: int = 60, dim: int = 576,
           extra: str | None = None) -> None:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgeadapt.export import onnx_graph as og
    from edgeadapt.graphs import blocked as ob

    rng = np.random.default_rng(0)
    ws = [(rng.standard_normal((dim, dim)) / np.sqrt(dim)).astype(np.float32)
          for _ in range(layers)]  # (in, out): the exporter's transposed layout

    def graph(kind: str) -> bytes:
        xv = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", dim])
        yv = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "s", dim])
        inputs, inits, nodes, cur = [xv], [], [], "x"
        for i in range(layers):
            blocked_input = kind.startswith("live, block ") or kind == "live, blocked32 as A"
            block = int(kind.split()[-1]) if kind.startswith("live, block ") else 32
            if kind.startswith("const"):
                inits.append(numpy_helper.from_array(ws[i], f"W{i}"))
            else:
                shape = [dim // block, dim, block] if blocked_input else [dim, dim]
                inputs.append(helper.make_tensor_value_info(f"W{i}", TensorProto.FLOAT, shape))
            if kind.startswith("live, block "):  # the blocked32 rewrite with another block
                nodes += [helper.make_node("MatMul", [cur, f"W{i}"], [f"u{i}"]),
                          helper.make_node("Transpose", [f"u{i}"], [f"t{i}"], perm=[1, 0, 2]),
                          helper.make_node("Reshape", [f"t{i}", "shape3"], [f"h{i}"])]
            elif kind == "live, blocked32 as A":  # per block (32, in) @ x^T, then back
                nodes += [helper.make_node("Reshape", [cur, "shape2"], [f"f{i}"]),
                          helper.make_node("Transpose", [f"f{i}"], [f"t{i}"], perm=[1, 0]),
                          helper.make_node("FusedMatMul", [f"W{i}", f"t{i}"], [f"u{i}"],
                                           domain="com.microsoft", transA=1),
                          helper.make_node("Reshape", [f"u{i}", "shape_out"], [f"v{i}"]),
                          helper.make_node("Transpose", [f"v{i}"], [f"g{i}"], perm=[1, 0]),
                          helper.make_node("Reshape", [f"g{i}", "shape3"], [f"h{i}"])]
            elif kind == "live, W as A":  # W holds (out, in) here: h = (W @ x^T)^T
                nodes += [helper.make_node("Transpose", [cur], [f"t{i}"], perm=[0, 2, 1]),
                          helper.make_node("MatMul", [f"W{i}", f"t{i}"], [f"u{i}"]),
                          helper.make_node("Transpose", [f"u{i}"], [f"h{i}"], perm=[0, 2, 1])]
            else:
                nodes.append(helper.make_node("MatMul", [cur, f"W{i}"], [f"h{i}"]))
            cur = f"h{i}"
        nodes.append(helper.make_node("Identity", [cur], ["y"]))
        inits += [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
                  (("shape2", [-1, dim]), ("shape3", [1, -1, dim]), ("shape_out", [dim, -1]))]
        model = helper.make_model(helper.make_graph(nodes, "chain", inputs, [yv], inits),
                                  opset_imports=[helper.make_opsetid("", 20),
                                                 helper.make_opsetid("com.microsoft", 1)])
        model.ir_version = 10
        if _b32_inputs(kind):
            ob.block_live_matmuls(model, {f"W{i}": og.LiveWeight(f"W{i}", og.TRANSPOSED,
                                                                 (dim, dim))
                                          for i in range(layers)})  # the exporter's rewrite
        if kind == KERNEL:  # the runtime's: one edgeadapt.BlockedMatMul per reader
            ob.kernel_blocked_matmuls(model, [f"W{i}.B32" for i in range(layers)])
        return model.SerializeToString()

    def session(kind: str):
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        if kind == "const, prepacking off":
            so.add_session_config_entry("session.disable_prepacking", "1")
        if kind == KERNEL:
            from edgeadapt.runtime.backends.onnxruntime import kernel as onnxruntime_kernel

            onnxruntime_kernel.register(so)
        return ort.InferenceSession(graph(kind), so, providers=["CPUExecutionProvider"])

    kinds = ["const (prepacked)", "const, prepacking off", "live", "live, W as A",
             "live, blocked32"]
    weights = {"live": ws, "live, W as A": [w.T.copy() for w in ws],
               "live, blocked32": [og.to_backend_layout(w.T, og.BLOCKED) for w in ws]}
    if extra == "blocks":
        for block in (64, 96, 144, 192, 288):
            kinds.append(f"live, block {block}")
            weights[kinds[-1]] = [_blocked(w, block) for w in ws]
    elif extra == "blocked-as-a":
        kinds.append("live, blocked32 as A")
        weights[kinds[-1]] = weights["live, blocked32"]
    elif extra == "kernel":
        kinds.append(KERNEL)
        weights[KERNEL] = weights["live, blocked32"]
    sess = {k: session(k) for k in kinds}
    bindings = {}
    for k, wl in weights.items():
        b = sess[k].io_binding()
        vals = [ort.OrtValue.ortvalue_from_numpy(w) for w in wl]
        for i, v in enumerate(vals):
            b.bind_ortvalue_input(f"W{i}" + (".B32" if _b32_inputs(k) else ""), v)
        bindings[k] = (b, vals)
    flush = (np.ones(32 << 20, np.float32), np.empty(32 << 20, np.float32))
    for shape in shapes.split(","):
        _, seq = (int(v) for v in shape.split("x"))
        x = rng.standard_normal((1, seq, dim)).astype(np.float32)

        def case(k, x=x):
            def run():
                np.copyto(flush[1], flush[0])  # evict the weights (timed alike for all)
                if k not in bindings:
                    return sess[k].run(None, {"x": x})[0]
                b = bindings[k][0]
                b.bind_cpu_input("x", x)
                b.bind_output("y", "cpu")
                sess[k].run_with_iobinding(b)
                out = b.get_outputs()[0].numpy()
                b.clear_binding_outputs()
                return out
            return run

        cases = {k: case(k) for k in kinds}
        ref = cases[kinds[0]]()
        for k in kinds[1:]:
            got = cases[k]()
            assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max(), k
        copy = time_interleaved({"copy": lambda: np.copyto(flush[1], flush[0])},
                                repeats=repeats, warmup=1)["copy"]
        samples = time_interleaved(cases, repeats=repeats, warmup=2)
        base = float(np.median(samples[kinds[0]])) - float(np.median(copy))
        for k, v in samples.items():
            t = float(np.median(v)) - float(np.median(copy))
            print(f"{shape} {k}: {t:.2f} ms ({t / base:.2f} x prepacked; "
                  f"{layers * dim * dim * 4 / t / 1e6:.1f} GB/s of weights)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("probe", choices=["sessions", "output", "profile", "matmul"])
    ap.add_argument("bundle", help="bundle directory ('-' for matmul)")
    ap.add_argument("shape", help="BxS, e.g. 8x64 (matmul: a comma-separated list, B = 1)")
    ap.add_argument("--k", type=int, default=3, help="sessions per mode (sessions probe)")
    ap.add_argument("--modes", default="base,live",
                    help="sessions probe: base first, then live and/or matmul (see _load)")
    ap.add_argument("--threads", type=int, default=1, help="sessions probe: intra-op threads")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--extra", choices=["blocks", "blocked-as-a", "kernel"],
                    help="matmul: more live forms (module docstring)")
    args = ap.parse_args()
    if args.probe == "sessions":
        sessions(args.bundle, args.shape, args.k, args.repeats, args.modes, args.threads)
    elif args.probe == "output":
        output(args.bundle, args.shape, args.repeats)
    elif args.probe == "profile":
        profile(args.bundle, args.shape, args.repeats)
    else:
        matmul(args.shape, args.repeats, extra=args.extra)


if __name__ == "__main__":
    main()
