"""How close the PyTorch reference of a quantized bundle (edgeadapt/models/quantized.py) is to
ONNX Runtime on MiniLM: each Linear alone on its real inputs, and the whole model.

    .venv/bin/python -m experiments.quant_reference_probe

Layer by layer: the inputs of every 5th of MiniLM's 36 body Linears (8 x 64 random tokens) go
through a single MatMul quantized by ONNX Runtime's own tool (:func:`ort_quantized_matmul`,
also the reference of tests/test_quant_reference.py) and through the reference. Whole model: the
fp32 ONNX export with every body Linear quantized by the same tool (the head fp32, a head of a
trained run's scale drawn at random) against ``quantize_reference_(lm, p, live=[])``, at 1 x 1,
1 x 64 and 8 x 64. Prints ``max |y_ort - y_ref| / max |y_ort|`` (and against fp32). The numbers
quoted in the module docstring of edgeadapt/models/quantized.py come from this script.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from edgeadapt.format.quant import grid
from edgeadapt.models import LogitsModule, example_inputs, load_model
from edgeadapt.models.quantized import QuantizedLinear, WeightQuant, quantize_reference_
from edgeadapt.models.targets import quantized_weight_names


def _save_quantized(model: onnx.ModelProto, precision: str, src: Path, dst: Path,
                    nodes: list[str] | None = None) -> None:
    """Quantize ``model`` with ONNX Runtime's tool as the exporter does (MatMulNBits, 8 or 4
    bits, symmetric blocks of 32, accuracy level 4), only the MatMuls ``nodes`` if given (the
    tool's ``nodes_to_include`` only adds: the others are excluded)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model.ir_version = 9  # ONNX Runtime's tools refuse newer IR versions
    onnx.save(model, src)
    others = [n.name for n in model.graph.node if n.op_type == "MatMul" and nodes is not None
              and n.name not in nodes]
    q = MatMulNBitsQuantizer(onnx.load(src), bits=grid(precision).bits, block_size=32,
                             is_symmetric=True, accuracy_level=4, nodes_to_exclude=others)
    q.process()
    out = q.model.model
    out.ir_version = 9
    onnx.save(out, dst)


def ort_quantized_matmul(w: np.ndarray, precision: str, workdir: Path, rank: int = 2):
    """An ONNX Runtime session (one thread) of ``x @ w.T`` (w: (out, in)) quantized by ONNX
    Runtime's own tool; x: (m, in), or (b, m, in) with ``rank`` 3."""
    import onnxruntime as ort

    n, k = w.shape
    dims = ["b", "m", k] if rank == 3 else ["m", k]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "B"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*dims[:-1], n])],
        [numpy_helper.from_array(np.ascontiguousarray(w.T), "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    dst = workdir / f"{precision}.onnx"
    _save_quantized(model, precision, workdir / "f.onnx", dst)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(dst), opts, providers=["CPUExecutionProvider"])


def reference_linear(w: np.ndarray, precision: str, activations: bool) -> QuantizedLinear:
    """The reference of ``x @ w.T`` on the ``precision`` grid (bias-free)."""
    base = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.from_numpy(w))
    return QuantizedLinear(base, WeightQuant(base.weight, precision, activations))


def max_rel(got: np.ndarray, want: np.ndarray) -> float:
    """``max |got - want| / max |want|``."""
    return float(np.abs(got - want).max() / np.abs(want).max())


def layer_by_layer(lm) -> None:
    names = quantized_weight_names(lm.model, lm.kind)
    inputs: dict[str, np.ndarray] = {}

    def keep(name):
        def hook(module, args, output):
            inputs.setdefault(name, args[0].detach().numpy().copy())
        return hook

    hooks = [lm.model.get_submodule(n.removesuffix(".weight")).register_forward_hook(keep(n))
             for n in names]
    with torch.no_grad():
        lm.model(**example_inputs(lm, batch=8, seq=64, seed=2))
    for h in hooks:
        h.remove()
    params = dict(lm.model.named_parameters())
    for p in ("int8", "int4"):
        for n in names[::5]:
            w = params[n].detach().numpy()
            sess = ort_quantized_matmul(w, p, Path(tempfile.mkdtemp()), rank=3)
            with torch.no_grad():
                ref = reference_linear(w, p, True)(torch.from_numpy(inputs[n])).numpy()
            got = sess.run(None, {"x": inputs[n]})[0]
            print(f"layer {p} {n}: {max_rel(ref, got):.2e}", flush=True)


def whole_model(lm) -> None:
    import onnxruntime as ort

    from edgeadapt.export.onnx_quant import constant_matmuls

    ex = example_inputs(lm, batch=2, seq=8)
    b, s = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("seq", min=1)
    proto = torch.onnx.export(
        LogitsModule(lm).eval(), (ex["input_ids"], ex["attention_mask"]),
        dynamic_shapes=({0: b, 1: s}, {0: b, 1: s}), input_names=["input_ids", "attention_mask"],
        output_names=["logits"], dynamo=True, optimize=True, verbose=False).model_proto
    del proto.graph.value_info[:]  # stale shapes the quantizer's shape inference rejects
    params = dict(lm.model.named_parameters())
    names = quantized_weight_names(lm.model, lm.kind)
    nodes = constant_matmuls(proto, {n: params[n].detach().numpy() for n in names})
    work = Path(tempfile.mkdtemp())
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    for p in ("int8", "int4"):
        _save_quantized(onnx.ModelProto.FromString(proto.SerializeToString()), p,
                        work / "f.onnx", work / f"{p}.onnx", nodes)
        sess = ort.InferenceSession(str(work / f"{p}.onnx"), opts,
                                    providers=["CPUExecutionProvider"])
        ref = load_model("minilm")
        ref.model.load_state_dict(lm.model.state_dict())
        quantize_reference_(ref, p, live=[])
        for bb, ss, seed in ((1, 1, 0), (1, 64, 1), (8, 64, 2)):
            x = example_inputs(lm, batch=bb, seq=ss, seed=seed)
            with torch.no_grad():
                want = LogitsModule(ref)(**x).numpy()
                fp32 = LogitsModule(lm)(**x).numpy()
            got = sess.run(None, {k: v.numpy() for k, v in x.items()})[0]
            print(f"whole {p} {bb}x{ss}: ort vs reference {max_rel(got, want):.2e}, ort vs "
                  f"fp32 {max_rel(got, fp32):.2e}", flush=True)


def main() -> None:
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    lm = load_model("minilm")
    torch.manual_seed(3)
    with torch.no_grad():
        lm.model.classifier.weight.normal_(0, 0.5)
    layer_by_layer(lm)
    whole_model(lm)


if __name__ == "__main__":
    main()
