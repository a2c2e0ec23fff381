"""edgeadapt's quantized ops at one token (``--rows``: tokens a run), float activations
(``accuracy_level`` 0: codes converted to float, FMA) against int8 per block of 32 (level 4:
vpdpbusd), beside ONNX
Runtime's own ``MatMulNBits`` at level 4 on the same codes (kernels/blocked_matmul.cpp,
"Activations").

SmolLM2-135M's attention inputs: ``--layers`` layers' worth of one x (rows, 576) read by q
(576 x 576), k and v (576 x 192 each), random codes and scales per block of 32 (every layer its
own, so that they stream from memory as a decode step's do); per ``--codes`` form (int4:
``Q4BlockedMatMul``, two codes a byte; int8: ``QBlockedMatMul``) one graph per case:

- ``float`` / ``int8``: one edgeadapt node per layer, ``op(x, q, k, v)``, at level 0 / 4;
- ``nbits``: one ``MatMulNBits`` per layer of the three concatenated (N = 960, as
  onnxruntime-genai fuses q, k and v), the form's bits, level 4, packed by ONNX Runtime.

Codes are initializers (edgeadapt's kernel reads them in place either way). The cases are
timed interleaved (:func:`edgeadapt.timer.time_interleaved`, ``--inner`` runs a sample);
printed per form: each output's largest distance to ``nbits`` (relative to its largest
magnitude), each case's median run and time per weight, and the medians of the per-round
ratios.

    .venv/bin/python -m experiments.q4_activation_probe [--codes int4,int8] [--layers 30]
        [--rounds 15] [--inner 10] [--threads 1] [--rows 1]
"""

from __future__ import annotations

import argparse

import numpy as np

K, OUTS = 576, (576, 192, 192)
CASES = ("float", "int8", "nbits")


def _model(nodes, inits, opset: str) -> bytes:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes, "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", K])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None)
         for n in nodes for o in n.output], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid(opset, 1)])
    model.ir_version = 9
    return model.SerializeToString()


def graphs(codes: str, layers: int, seed: int = 0) -> dict[str, bytes]:
    """Case name -> its serialized graph, every case on the same codes and scales."""
    from onnx import helper, numpy_helper

    from edgeadapt.format import nibbles
    from edgeadapt.format.layout import BLOCKED, to_backend
    from edgeadapt.graphs.blocked import Q4KERNEL_OP, QKERNEL_OP

    bits = 4 if codes == "int4" else 8
    rng = np.random.default_rng(seed)
    ours: dict[int, tuple[list, list]] = {0: ([], []), 4: ([], [])}
    nbits_nodes, nbits_inits = [], []
    for layer in range(layers):
        # MatMulNBits' codes: unsigned, offset by 2^(bits - 1)
        us = [rng.integers(0, 1 << bits, (n, K)).astype(np.uint8) for n in OUTS]
        ss = [rng.uniform(0.01, 0.1, (n, K // 32)).astype(np.float32) for n in OUTS]
        ins, inits = ["x"], []
        for i, (u, s) in enumerate(zip(us, ss, strict=True)):
            q = to_backend((u.astype(np.int16) - (1 << (bits - 1))).astype(np.int8), BLOCKED)
            inits += [numpy_helper.from_array(nibbles.pack(q) if bits == 4 else q,
                                              f"p{layer}_{i}"),
                      numpy_helper.from_array(to_backend(s, BLOCKED), f"s{layer}_{i}")]
            ins += [f"p{layer}_{i}", f"s{layer}_{i}"]
        for level, (nodes, all_inits) in ours.items():
            nodes.append(helper.make_node(Q4KERNEL_OP if bits == 4 else QKERNEL_OP, ins,
                                          [f"y{layer}_{i}" for i in range(3)],
                                          domain="edgeadapt", accuracy_level=level))
            all_inits += inits
        u, s = np.concatenate(us), np.concatenate(ss)
        n = u.shape[0]
        b = (u[:, 0::2] | (u[:, 1::2] << 4) if bits == 4 else u).reshape(n, K // 32, -1)
        nbits_inits += [numpy_helper.from_array(b, f"B{layer}"),
                        numpy_helper.from_array(s, f"S{layer}")]
        nbits_nodes.append(helper.make_node(
            "MatMulNBits", ["x", f"B{layer}", f"S{layer}"], [f"y{layer}"],
            domain="com.microsoft", K=K, N=n, bits=bits, block_size=32, accuracy_level=4))
    return {"float": _model(*ours[0], "edgeadapt"), "int8": _model(*ours[4], "edgeadapt"),
            "nbits": _model(nbits_nodes, nbits_inits, "com.microsoft")}


def probe(codes: str, layers: int, rounds: int, inner: int, threads: int, rows: int = 1
          ) -> None:
    import onnxruntime as ort

    from edgeadapt.runtime.backends.onnxruntime import kernel as ok
    from edgeadapt.timer import time_interleaved

    x = np.random.default_rng(1).standard_normal((rows, K)).astype(np.float32)
    sessions = {}
    for name, model in graphs(codes, layers).items():
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        ok.register(so)
        sessions[name] = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    def layers_out(outs: list) -> np.ndarray:  # (layers, rows, 960): q | k | v per layer
        per = len(outs) // layers
        return np.stack([np.concatenate(outs[i * per:(i + 1) * per], axis=-1)
                         for i in range(layers)])

    y = {n: layers_out(s.run(None, {"x": x})) for n, s in sessions.items()}
    top = np.abs(y["nbits"]).max()
    print(f"{codes}: largest |y - nbits| / max |nbits|: "
          + ", ".join(f"{n} {np.abs(y[n] - y['nbits']).max() / top:.2e}" for n in CASES[:2]))
    t = {n: np.array(v) for n, v in time_interleaved(
        {n: (lambda s=s: s.run(None, {"x": x})) for n, s in sessions.items()},
        repeats=rounds, inner=inner).items()}
    weights = layers * K * sum(OUTS) * rows
    for n in CASES:
        m = float(np.median(t[n]))
        print(f"  {n:6s} {m:.3f} ms a run, {m * 1e9 / weights:5.1f} ps a weight and row")
    print(f"  p50 of {rounds} per-round ratios: int8 / nbits "
          f"{np.median(t['int8'] / t['nbits']):.3f}, float / nbits "
          f"{np.median(t['float'] / t['nbits']):.3f}, int8 / float "
          f"{np.median(t['int8'] / t['float']):.3f}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--codes", default="int4,int8")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--inner", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", type=int, default=1, help="tokens a run (rows of x)")
    args = ap.parse_args(argv)
    for codes in args.codes.split(","):
        probe(codes, args.layers, args.rounds, args.inner, args.threads, args.rows)


if __name__ == "__main__":
    main()
