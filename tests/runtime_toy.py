"""A torch-free toy bundle: an ONNX MLP with some weights live, for the runtime tests and switch
timings where no exported transformer is at hand (a test helper, not part of the package).

Model (torch layout weights ``W_l`` of shape (out, in)): ``h_0 = x``,
``h_{l+1} = tanh(h_l @ W_l.T)`` for hidden layers, logits ``= h_L @ W_L.T``. Even layers are
``MatMul`` reading ``W.T`` ("transposed" layout), odd layers ``Gemm(transB=1)`` reading ``W``
("as-is"), so both layouts are exercised.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeadapt.format.fingerprint import weight_sha256
from edgeadapt.format.manifest import Manifest, WeightEntry, write_manifest


def toy_weights(dims: list[int], seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights ``layers.{l}.weight`` of shape (dims[l+1], dims[l]), float32."""
    rng = np.random.default_rng(seed)
    return {f"layers.{i}.weight": (rng.standard_normal((dims[i + 1], dims[i]))
                                   / np.sqrt(dims[i])).astype(np.float32)
            for i in range(len(dims) - 1)}


def toy_forward(x: np.ndarray, weights: dict[str, np.ndarray]) -> np.ndarray:
    """The numpy reference of the toy graph (float64 accumulation)."""
    h = np.asarray(x, dtype=np.float64)
    names = sorted(weights, key=lambda n: int(n.split(".")[1]))
    for i, name in enumerate(names):
        h = h @ weights[name].astype(np.float64).T
        if i < len(names) - 1:
            h = np.tanh(h)
    return h


def write_toy_bundle(out_dir: str | Path, weights: dict[str, np.ndarray], live: list[str],
                     adapters: dict[str, tuple[str, str]] | None = None) -> Manifest:
    """Write ``model.onnx`` (+ external data), ``live_weights.safetensors`` and
    ``bundle.json`` into ``out_dir``; ``live`` weights become graph inputs.

    adapters: name -> (relative file, method) entries to register (files written elsewhere).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from safetensors.numpy import save_file

    from edgeadapt.format.manifest import AdapterEntry

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = sorted(weights, key=lambda n: int(n.split(".")[1]))
    d_in = weights[names[0]].shape[1]
    d_out = weights[names[-1]].shape[0]
    nodes, inits, graph_inputs = [], [], [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", d_in])]
    entries, live_tensors = {}, {}
    h = "x"
    for i, name in enumerate(names):
        w = weights[name]
        layout = "transposed" if i % 2 == 0 else "as-is"
        gname = f"live_{i}" if name in live else f"w_{i}"
        arr = np.ascontiguousarray(w.T if layout == "transposed" else w)
        if name in live:
            graph_inputs.append(helper.make_tensor_value_info(gname, TensorProto.FLOAT,
                                                              list(arr.shape)))
            live_tensors[gname] = arr
            entries[name] = WeightEntry(shape=tuple(w.shape), dtype="float32",
                                        sha256=weight_sha256(w),
                                        onnxruntime={"name": gname, "layout": layout})
        else:
            inits.append(numpy_helper.from_array(arr, gname))
        y = f"h{i}" if i < len(names) - 1 else "logits"
        mm = y + "_mm" if i < len(names) - 1 else y
        if layout == "transposed":
            nodes.append(helper.make_node("MatMul", [h, gname], [mm]))
        else:
            nodes.append(helper.make_node("Gemm", [h, gname], [mm], transB=1))
        if i < len(names) - 1:
            nodes.append(helper.make_node("Tanh", [mm], [y]))
        h = y
    graph = helper.make_graph(nodes, "toy", graph_inputs, [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", d_out])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.save(model, str(out / "model.onnx"), save_as_external_data=True,
              location="model.onnx.data", size_threshold=0)
    save_file(live_tensors, str(out / "live_weights.safetensors"))
    manifest = Manifest(
        model="toy-mlp", kind="classifier", targets_spec="toy", weights=entries,
        inputs=[{"name": "x", "dtype": "float32", "shape": ["batch", d_in]}],
        onnxruntime={"file": "model.onnx", "live_weights": "live_weights.safetensors"},
        adapters={n: AdapterEntry(file=f, method=m) for n, (f, m) in (adapters or {}).items()})
    write_manifest(out, manifest)
    return manifest
