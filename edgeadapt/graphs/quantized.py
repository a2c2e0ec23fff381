"""Quantized live weights in an ONNX graph (onnx + numpy, no torch): written by the exporter,
handed to edgeadapt's kernel by the runtime at load.

A quantized live weight ``W (out, in)`` (:mod:`edgeadapt.format.quant`) is two graph inputs:
its int8 codes ``Q = <w>.B32.q (out/32, in, 32)`` in the blocked32 layout and its scales
``S = <w>.B32.s (out/32, in/G, 32)`` (the ``(out, in/G)`` scales in the same layout). The
exported graph dequantizes them into the blocked32 value its readers already take
(:func:`edgeadapt.graphs.blocked.block_live_matmuls`)::

    Xb = Reshape(Cast(Q, float) reshaped (out/32, in/G, G, 32) * Unsqueeze(S, 2),
                 [out/32, in, 32])

so the graph runs anywhere (a dequantization per call); :func:`kernel_quantized_matmuls`
replaces each reader and the dequantization by one ``edgeadapt.QBlockedMatMul(x, Q, S)`` that
reads the codes in place (:mod:`edgeadapt.runtime.backends.onnxruntime.kernel`), or, for int4
codes the runtime holds two per byte, by ``edgeadapt.Q4BlockedMatMul(x, P, S)`` with the codes
input retyped to the packed ``P (out/32, in, 16)`` uint8 (:mod:`edgeadapt.format.nibbles`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeadapt.errors import ExportError
from edgeadapt.format import nibbles
from edgeadapt.format.layout import BLOCKED
from edgeadapt.graphs.blocked import (
    KERNEL_DOMAIN,
    Q4KERNEL_OP,
    QKERNEL_OP,
    _blocked_readers,
    _rewrite_readers,
)
from edgeadapt.graphs.values import LiveWeight, all_value_names, consumers

_DQ = "edgeadapt_dq"


@dataclass(frozen=True)
class QuantizedInput:
    """A quantized live weight's graph inputs: ``codes`` (int8, blocked32) and ``scales``
    (float), and ``value``, the dequantized blocked32 value the readers take."""

    codes: str
    scales: str
    value: str


def quantized_names(blocked_name: str) -> tuple[str, str]:
    """(codes input, scales input) names of the blocked32 input ``blocked_name``."""
    return f"{blocked_name}.q", f"{blocked_name}.s"


def dequantize_live_inputs(model: onnx.ModelProto, live: dict[str, LiveWeight],
                           groups: dict[str, int]) -> dict[str, QuantizedInput]:
    """Turn the blocked32 live inputs of the weights in ``groups`` (torch name -> ``G``, input
    columns per scale) into codes + scales inputs and the dequantization above, its output
    keeping the old input's name (so its readers are unchanged). Returns torch name ->
    :class:`QuantizedInput`; ExportError for a weight that is not a blocked32 input."""
    graph = model.graph
    inputs = {vi.name: vi for vi in graph.input}
    taken = all_value_names(graph)
    nodes, consts, result = [], {}, {}
    for w, group in groups.items():
        lw = live.get(w)
        if lw is None or lw.layout != BLOCKED or lw.name not in inputs:
            raise ExportError(f"live weight {w!r} is not a blocked32 graph input; only those "
                              "can be quantized")
        nb, inp, blk = lw.shape
        if inp % group:
            raise ExportError(f"live weight {w!r}: {inp} input columns are not groups of {group}")
        codes, scales = quantized_names(lw.name)
        if {codes, scales} & taken:
            raise ExportError(f"cannot name the quantized inputs of {w!r}: {codes!r} or "
                              f"{scales!r} is taken")
        g4, full = f"{_DQ}_shape_{inp // group}x{group}", f"{_DQ}_shape_{inp}"
        consts[g4] = np.array([-1, inp // group, group, blk], np.int64)
        consts[full] = np.array([-1, inp, blk], np.int64)
        consts[f"{_DQ}_axis2"] = np.array([2], np.int64)
        cast, grouped, unsq, prod = (f"{lw.name}/{_DQ}_{s}" for s in
                                     ("cast", "grouped", "scales", "product"))
        nodes += [helper.make_node("Cast", [codes], [cast], to=TensorProto.FLOAT,
                                   name=f"{lw.name}/dq_cast"),
                  helper.make_node("Reshape", [cast, g4], [grouped], name=f"{lw.name}/dq_group"),
                  helper.make_node("Unsqueeze", [scales, f"{_DQ}_axis2"], [unsq],
                                   name=f"{lw.name}/dq_scales"),
                  helper.make_node("Mul", [grouped, unsq], [prod], name=f"{lw.name}/dq_mul"),
                  helper.make_node("Reshape", [prod, full], [lw.name],
                                   name=f"{lw.name}/dq_shape")]
        graph.input.remove(inputs[lw.name])
        graph.input.extend([
            helper.make_tensor_value_info(codes, TensorProto.INT8, [nb, inp, blk]),
            helper.make_tensor_value_info(scales, TensorProto.FLOAT, [nb, inp // group, blk])])
        result[w] = QuantizedInput(codes, scales, lw.name)
    existing = {i.name for i in graph.initializer}
    graph.initializer.extend(numpy_helper.from_array(v, n) for n, v in consts.items()
                             if n not in existing)
    rest = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + rest)  # before every reader: the graph stays sorted
    return result


def quantized_inputs(model: onnx.ModelProto) -> dict[str, QuantizedInput]:
    """The quantized live inputs of a graph :func:`dequantize_live_inputs` wrote, by codes
    input name."""
    found = {}
    for node in model.graph.node:
        if node.op_type == "Cast" and node.name.endswith("/dq_cast"):
            value = node.name.removesuffix("/dq_cast")
            found[node.input[0]] = QuantizedInput(node.input[0], quantized_names(value)[1], value)
    return found


def kernel_quantized_matmuls(model: onnx.ModelProto, codes: set[str] | list[str],
                             packed: set[str] | frozenset[str] = frozenset()) -> int:
    """Replace each reader of the named quantized inputs (``codes`` input names) and their
    dequantization by one ``y = edgeadapt.QBlockedMatMul(x, Q, S)`` node, or
    ``edgeadapt.Q4BlockedMatMul(x, P, S)`` for those in ``packed`` (their input retyped to the
    packed uint8 codes). Returns how many readers were replaced."""
    graph = model.graph
    inputs = {vi.name: vi for vi in graph.input}
    found = quantized_inputs(model)
    producers = {o: n for n in graph.node for o in n.output}
    uses = consumers(graph)
    drop: set[int] = set()
    replace: dict[int, onnx.NodeProto] = {}
    for name in codes:
        q = found.get(name)
        if q is None:
            raise ExportError(f"{name!r} is not a quantized live input of this graph")
        op = QKERNEL_OP
        if name in packed:
            op = Q4KERNEL_OP
            vi = inputs[name]
            dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
            graph.input.remove(vi)
            graph.input.append(helper.make_tensor_value_info(
                name, TensorProto.UINT8, list(nibbles.packed_shape(tuple(dims)))))
        for flat, mm, tr, rs in _blocked_readers(graph, q.value, uses, producers):
            replace[id(mm)] = helper.make_node(op, [flat.input[0], q.codes, q.scales],
                                               [rs.output[0]], name=mm.name,
                                               domain=KERNEL_DOMAIN)
            drop.update((id(tr), id(rs)))
        drop.update(id(n) for n in graph.node if n.name.startswith(f"{q.value}/dq_"))
    if replace:
        _rewrite_readers(graph, replace, drop)
        read = {i for n in graph.node for i in n.input}
        for init in [i for i in graph.initializer
                     if i.name.startswith(_DQ) and i.name not in read]:
            graph.initializer.remove(init)
        if not any(o.domain == KERNEL_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(KERNEL_DOMAIN, 1))
    return len(replace)

