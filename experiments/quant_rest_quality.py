"""Which ONNX Runtime quantized kernels keep a model's quality: Hamlet NLL of SmolLM2 under each
way to quantize the transformer blocks' weights (the choice in edgeadapt/export/onnx_quant.py).

    python -m experiments.quant_rest_quality --bundle bundles/quant-smollm2/fp32 \
        --affine-bundle bundles/smollm2-generate-int4-affine

Every variant is the fp32 bundle's graph with all weights constant, the blocks' Linears
quantized by one of ONNX Runtime's tools, run on the same 8 x 128 tokens of Hamlet
(``hamlet.txt``, characters 20,000-40,000); the mean next-token NLL (nats) and the share of
positions whose argmax equals fp32's. Also the grids alone (weights only, float activations) in
PyTorch, to tell the grid's loss from the activations', ONNX Runtime's asymmetric int4 (a uint8
zero point per block), and, with ``--affine-bundle``, edgeadapt's int4-affine bundle itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np
import onnx
import torch

from edgeadapt.bench.quantized import constant_graph
from edgeadapt.export.onnx_quant import constant_matmuls
from edgeadapt.format.quant import INT4, INT4_AFFINE, INT8, affine_split, offset_weight
from edgeadapt.models import load_model
from edgeadapt.models.targets import target_weight_names
from edgeadapt.runtime import load
from edgeadapt.runtime.backends.onnxruntime.session import open_session, session_options
from edgeadapt.tasks.registry import read_text


def _nll(logits: np.ndarray, ids: np.ndarray) -> float:
    lg = logits[:, :-1].astype(np.float64)
    top = lg.max(-1, keepdims=True)
    lse = top[..., 0] + np.log(np.exp(lg - top).sum(-1))
    return float((lse - np.take_along_axis(lg, ids[:, 1:, None], -1)[..., 0]).mean())


def variants(proto_of, nodes: list[str]):
    """(name, quantized ModelProto) per tool."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    for bits in (8, 4):
        for level in (4, 0):
            model = proto_of()
            keep = set(nodes)
            tool = MatMulNBitsQuantizer(model, bits=bits, block_size=32, is_symmetric=True,
                                        accuracy_level=level, op_types_to_quantize=("MatMul",),
                                        nodes_to_exclude=[n.name for n in model.graph.node
                                                          if n.name not in keep])
            tool.process()
            yield f"MatMulNBits int{bits} blocks of 32, accuracy level {level}", tool.model.model
    model = proto_of()
    tool = MatMulNBitsQuantizer(model, bits=4, block_size=32, is_symmetric=False,
                                accuracy_level=4, op_types_to_quantize=("MatMul",),
                                nodes_to_exclude=[n.name for n in model.graph.node
                                                  if n.name not in set(nodes)])
    tool.process()
    yield ("MatMulNBits int4 asymmetric (uint8 zero point per block), accuracy level 4",
           tool.model.model)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(proto_of(), f"{tmp}/a.onnx", save_as_external_data=True)
        quantize_dynamic(f"{tmp}/a.onnx", f"{tmp}/b.onnx", per_channel=True,
                         weight_type=QuantType.QInt8, nodes_to_quantize=nodes,
                         op_types_to_quantize=["MatMul"], use_external_data_format=True,
                         extra_options={"MatMulConstBOnly": True})
        yield "quantize_dynamic int8 per channel (uint8 activations)", onnx.load(f"{tmp}/b.onnx")


@click.command()
@click.option("--bundle", required=True, type=click.Path(exists=True, file_okay=False),
              help="an fp32 SmolLM2 bundle (onnxruntime, q/v live)")
@click.option("--affine-bundle", type=click.Path(exists=True, file_okay=False), default=None,
              help="an --weights int4-affine SmolLM2 bundle (onnxruntime) to run as well")
@click.option("--threads", default=2, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None)
def main(bundle: str, affine_bundle: str | None, threads: int, json_path: str | None) -> None:
    lm = load_model("smollm2", seed=0)
    text = read_text("hamlet.txt")[20000:40000]
    ids = np.array(lm.tokenizer(text)["input_ids"][:1024], np.int64).reshape(8, 128)
    ref = load(bundle, threads=threads).run(input_ids=ids)
    rows = [{"variant": "fp32", "nll": _nll(ref, ids), "argmax_agree": 1.0}]
    body = {w: lm.model.get_parameter(w).detach().numpy()
            for w in target_weight_names(lm.model, "all")}
    base = constant_graph(Path(bundle), lm)
    nodes = constant_matmuls(base, body)
    for name, model in variants(lambda: onnx.ModelProto.FromString(base.SerializeToString()),
                                nodes):
        sess = open_session(model.SerializeToString(), session_options(threads), Path(bundle))
        out = sess.run(None, {"input_ids": ids})[0]
        rows.append({"variant": name, "nll": _nll(out, ids),
                     "argmax_agree": float((out.argmax(-1) == ref.argmax(-1)).mean())})
    if affine_bundle:
        out = load(affine_bundle, threads=threads).run(input_ids=ids)
        rows.append({"variant": "edgeadapt --weights int4-affine bundle (its runtime)",
                     "nll": _nll(out, ids),
                     "argmax_agree": float((out.argmax(-1) == ref.argmax(-1)).mean())})
    with torch.no_grad():
        for grid in (INT8, INT4, INT4_AFFINE):
            saved = {w: lm.model.get_parameter(w).data.clone() for w in body}
            for w, arr in body.items():
                shifted, offsets = affine_split(arr, grid) if grid.affine else (arr, None)
                held = grid.dequantize(*grid.quantize(shifted))
                if offsets is not None:
                    held = held + offset_weight(offsets, grid, held.shape)
                lm.model.get_parameter(w).data = torch.from_numpy(held)
            out = lm.model(input_ids=torch.from_numpy(ids)).logits.float().numpy()
            rows.append({"variant": f"PyTorch, {grid.name} grid weights only", "nll":
                         _nll(out, ids), "argmax_agree": float(
                             (out.argmax(-1) == ref.argmax(-1)).mean())})
            for w, t in saved.items():
                lm.model.get_parameter(w).data = t
    for r in rows:
        click.echo(f"| {r['variant']} | {r['nll']:.3f} | {r['argmax_agree']:.3f} |")
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
