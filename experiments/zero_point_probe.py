"""Which ``MatMulNBits`` zero points ONNX Runtime's CPU kernel runs at speed: one int4 MatMul
(SmolLM2's gate/up shape, 576 -> 1536, blocks of 32) with no zero points (symmetric), uint8 zero
points (asymmetric, one per block, packed) and float zero points (``T``, exact for an affine
grid), each against the numpy product of its own dequantized weight (docs/quantized.md, "The
affine int4 grid").

    python -m experiments.zero_point_probe [--rows 1] [--level 0] [--threads 2]

Prints per form the max relative error and the median time of a run.
"""

from __future__ import annotations

import time

import click
import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

K, N, G = 576, 1536, 32


def _session(packed: np.ndarray, scales: np.ndarray, zp: np.ndarray | None, level: int,
             threads: int) -> ort.InferenceSession:
    inits = [helper.make_tensor("B", TensorProto.UINT8, packed.shape, packed.tobytes(), raw=True),
             numpy_helper.from_array(scales.reshape(-1), "S")]
    if zp is not None:
        inits.append(numpy_helper.from_array(zp, "Z"))
    node = helper.make_node("MatMulNBits", ["X", "B", "S"] + (["Z"] if zp is not None else []),
                            ["Y"], domain="com.microsoft", K=K, N=N, bits=4, block_size=G,
                            accuracy_level=level)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(
        "X", TensorProto.FLOAT, [None, K])], [helper.make_tensor_value_info(
            "Y", TensorProto.FLOAT, [None, N])], inits)
    model = helper.make_model(graph, ir_version=10, opset_imports=[
        helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])


@click.command()
@click.option("--rows", default=1, show_default=True, help="tokens (rows of X)")
@click.option("--level", default=0, show_default=True, help="MatMulNBits accuracy_level")
@click.option("--threads", default=2, show_default=True)
@click.option("--repeats", default=500, show_default=True)
def main(rows: int, level: int, threads: int, repeats: int) -> None:
    rng = np.random.default_rng(0)
    q = rng.integers(0, 16, (N, K)).astype(np.uint8)
    s = (rng.random((N, K // G)) * 0.01 + 0.001).astype(np.float32)
    lo = (rng.standard_normal((N, K // G)) * 0.05).astype(np.float32)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(N, K // G, G // 2)
    zp_u8 = np.clip(np.rint(-lo / s), 0, 15).astype(np.uint8)
    zp_u8_packed = (zp_u8[:, 0::2] | (zp_u8[:, 1::2] << 4)).reshape(-1)  # K // G is even
    zp_f = (-lo / s).astype(np.float32)
    full = np.repeat(s, G, axis=1)
    forms = {
        "none (symmetric, zero point 8)": (None, (q.astype(np.float32) - 8) * full),
        "uint8, packed": (zp_u8_packed, (q - np.repeat(zp_u8, G, 1).astype(np.float32)) * full),
        "float (T)": (zp_f.reshape(-1), (q - np.repeat(zp_f, G, 1)) * full),
    }
    x = rng.standard_normal((rows, K)).astype(np.float32)
    for name, (zp, weight) in forms.items():
        sess = _session(packed, s, zp, level, threads)
        y = sess.run(None, {"X": x})[0]
        ref = x @ weight.T
        for _ in range(50):
            sess.run(None, {"X": x})
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            sess.run(None, {"X": x})
            times.append(time.perf_counter() - t)
        err = float(np.abs(y - ref).max() / np.abs(ref).max())
        click.echo(f"| {name} | {err:.1e} | {np.median(times) * 1e6:.0f} us |")


if __name__ == "__main__":
    main()
