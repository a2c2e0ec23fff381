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

Those nodes compute with the activations of the graph's own ``MatMulNBits`` (their attribute
``accuracy_level``, :func:`stock_accuracy_level`): int8 per block of 32 input columns where those
use level 4, as an exported quantized graph's do (``edgeadapt.export.onnx_quant``), so that a
layer's k, which the int4 node computes beside its live q and v, keeps the semantics it was
exported with and the live weights see the activations their neighbours see; float
activations (level 0) where they use float (the export's checks run a copy of the graph at
level 0: ``onnx_quant.float_activations``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeadapt.errors import ExportError
from edgeadapt.format import nibbles
from edgeadapt.format.layout import BLOCKED, to_backend
from edgeadapt.graphs.blocked import (
    KERNEL_DOMAIN,
    Q4KERNEL_OP,
    QKERNEL_OP,
    KernelRewrite,
    ReaderGroups,
    _blocked_readers,
    _rewrite_readers,
    constant_array,
    merged_nodes,
    supplied_initializer,
)
from edgeadapt.graphs.values import LiveWeight, all_value_names, consumers

_DQ = "edgeadapt_dq"

#: ``accuracy_level`` of edgeadapt's quantized ops (MatMulNBits' attribute and values,
#: kernels/blocked_matmul.cpp, "Activations"): float activations, or int8 per block of 32 input
#: columns as ONNX Runtime's MatMulNBits quantizes them at level 4
FLOAT_ACTIVATIONS, INT8_ACTIVATIONS = 0, 4


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


def _accuracy_level(node: onnx.NodeProto) -> int:
    """A node's ``accuracy_level`` (absent: ONNX Runtime's default, 0)."""
    return next((helper.get_attribute_value(a) for a in node.attribute
                 if a.name == "accuracy_level"), 0)


def stock_accuracy_level(model: onnx.ModelProto) -> int:
    """The activations of the graph's own ``com.microsoft.MatMulNBits`` (top level):
    ``INT8_ACTIVATIONS`` where it has some and every one has ``accuracy_level`` 4, else
    ``FLOAT_ACTIVATIONS`` (none, or some at another level)."""
    levels = {_accuracy_level(n) for n in model.graph.node
              if n.op_type == "MatMulNBits" and n.domain == "com.microsoft"}
    return INT8_ACTIVATIONS if levels == {INT8_ACTIVATIONS} else FLOAT_ACTIVATIONS


def kernel_quantized_matmuls(model: onnx.ModelProto, codes: set[str] | list[str],
                             packed: set[str] | frozenset[str] = frozenset(),
                             base_dir: Path | None = None,
                             accuracy_level: int | None = None, every_constant: bool = False
                             ) -> KernelRewrite:
    """Replace the readers of the named quantized inputs (``codes`` input names) and their
    dequantization by ``edgeadapt.QBlockedMatMul`` nodes, ``edgeadapt.Q4BlockedMatMul`` for
    those in ``packed`` (their input retyped to the packed uint8 codes). Readers of one ``x``
    (of one op) become one node,

        y_1, ..., y_n = edgeadapt.Q4BlockedMatMul(x, P_1, S_1, ..., P_n, S_n)

    which every constant symmetric int4 ``MatMulNBits`` of that ``x`` joins (no zero points:
    its codes offset by 8, as :mod:`edgeadapt.format.nibbles` packs them; re-laid as packed
    codes and blocked scales, supplied constants (:class:`~edgeadapt.graphs.blocked.
    KernelRewrite`), its data read from ``base_dir`` where it is external and left as it is
    where that is None): a layer's q, k and v are one node, as
    :func:`edgeadapt.graphs.blocked.kernel_blocked_matmuls` makes them for float weights
    (``every_constant`` as there: every such MatMulNBits of the graph becomes a node, also
    where no live weight is int4: int4-affine-live8's int8 q/v beside an int4 rest).
    Every node gets ``accuracy_level`` (``FLOAT_ACTIVATIONS`` or ``INT8_ACTIVATIONS``; None:
    :func:`stock_accuracy_level` of the graph, read before the rewrite absorbs any), and
    absorbs only the MatMulNBits of that level (the others keep their own semantics).
    Returns how many live readers were replaced and the constants to supply."""
    graph = model.graph
    if accuracy_level is None:
        accuracy_level = stock_accuracy_level(model)
    if accuracy_level not in (FLOAT_ACTIVATIONS, INT8_ACTIVATIONS):
        raise ExportError(f"accuracy_level {accuracy_level}: edgeadapt's quantized kernel "
                          f"computes with float ({FLOAT_ACTIVATIONS}) or int8 "
                          f"({INT8_ACTIVATIONS}) activations")
    inputs = {vi.name: vi for vi in graph.input}
    found = quantized_inputs(model)
    producers = {o: n for n in graph.node for o in n.output}
    uses = consumers(graph)
    drop: set[int] = set()
    groups = ReaderGroups()
    for name in codes:
        q = found.get(name)
        if q is None:
            raise ExportError(f"{name!r} is not a quantized live input of this graph")
        op = QKERNEL_OP
        dims = [d.dim_value for d in inputs[name].type.tensor_type.shape.dim]
        if name in packed:
            op = Q4KERNEL_OP
            vi = inputs[name]
            graph.input.remove(vi)
            graph.input.append(helper.make_tensor_value_info(
                name, TensorProto.UINT8, list(nibbles.packed_shape(tuple(dims)))))
        for flat, mm, tr, rs in _blocked_readers(graph, q.value, uses, producers):
            groups.add(flat.input[0], op, (mm, [q.codes, q.scales], rs.output[0]),
                       math.prod(dims) // (2 if op == Q4KERNEL_OP else 1))
            drop.update((id(tr), id(rs)))
        drop.update(id(n) for n in graph.node if n.name.startswith(f"{q.value}/dq_"))
    if not groups.nodes:
        return KernelRewrite(0, {})
    replaced = groups.count()
    inits = {i.name: i for i in graph.initializer}
    made: dict[str, np.ndarray] = {}
    absorbed: set[str] = set()
    q4_xs = {x for x, op, _ in groups.nodes if op == Q4KERNEL_OP}
    if q4_xs or every_constant:
        for node in graph.node:
            if _accuracy_level(node) != accuracy_level or not node.input \
                    or not (every_constant or node.input[0] in q4_xs):
                continue
            arrays = _int4_constant(node, inits, set(inputs), base_dir)
            if arrays is not None:
                names = [f"{node.input[1]}/edgeadapt.P", f"{node.input[2]}/edgeadapt.S"]
                made.update(zip(names, arrays, strict=True))
                absorbed.update(node.input[1:])
                groups.add(node.input[0], Q4KERNEL_OP, (node, names, node.output[0]),
                           sum(a.nbytes for a in arrays))
    graph.initializer.extend(supplied_initializer(n, a) for n, a in made.items())
    merged = merged_nodes(graph, groups.nodes, drop)
    for node in merged.values():
        node.attribute.append(helper.make_attribute("accuracy_level", accuracy_level))
    _rewrite_readers(graph, merged, drop)
    read = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer
                 if (i.name.startswith(_DQ) or i.name in absorbed) and i.name not in read]:
        graph.initializer.remove(init)
    if not any(o.domain == KERNEL_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(KERNEL_DOMAIN, 1))
    return KernelRewrite(replaced, made)


def _int4_constant(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto],
                   overridable: set[str], base_dir: Path | None
                   ) -> tuple[np.ndarray, np.ndarray] | None:
    """``(P, S)`` of ``node`` where it is a ``com.microsoft.MatMulNBits`` with constant
    symmetric int4 codes (no zero points, ``N`` a multiple of 32, whole blocks):
    ``B (N, K/bs, bs/2)`` (code ``k`` of a block in byte ``k // 2``, low nibble first, offset
    by 8) re-laid as packed codes ``P (N/32, K, 16)`` (:mod:`edgeadapt.format.nibbles`) and
    ``scales (N, K/bs)`` as ``S (N/32, K/bs, 32)``; None otherwise."""
    if node.op_type != "MatMulNBits" or node.domain != "com.microsoft" \
            or len(node.input) != 3 or not all(node.input):
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    k, n, bs = attrs.get("K"), attrs.get("N"), attrs.get("block_size")
    b_name, s_name = node.input[1], node.input[2]
    if attrs.get("bits") != 4 or not k or not n or not bs or n % 32 or k % bs \
            or b_name not in inits or s_name not in inits or {b_name, s_name} & overridable:
        return None
    b, scales = (constant_array(inits[t], base_dir) for t in (b_name, s_name))
    if b is None or scales is None or b.dtype != np.uint8 or b.shape != (n, k // bs, bs // 2) \
            or scales.size != n * k // bs or scales.dtype != np.float32:
        return None
    nib = np.stack([b & 15, b >> 4], axis=-1).reshape(n, k).astype(np.int8) - 8
    packed = nibbles.pack(to_backend(nib, BLOCKED))
    blocked = to_backend(scales.reshape(n, k // bs), BLOCKED)
    return np.ascontiguousarray(packed), np.ascontiguousarray(blocked)
