"""A decoder graph's LM head: the logits of the last ``k`` positions only, the vocabulary in
chunks (onnx only, no torch).

The head is the last node of a decoder step, ``logits = MatMul(h, W)`` with ``h`` the normed
hidden states (batch, seq, hidden) and ``W`` (hidden, vocab) a constant (float32, or
``MatMulNBits`` codes in a quantized graph). :func:`keep_last_logits` rewrites it as::

    h_k    = Slice(h, starts=[-k], ends=[INT64_MAX], axes=[1])     k = logits_to_keep
    logits = Concat(MatMul(h_k, W[:, c_0:c_1]), MatMul(h_k, W[:, c_1:c_2]), ..., axis=-1)

- ``logits_to_keep`` (int64 scalar graph input): the last ``k`` positions' logits, as
  transformers' argument of that name; ``0`` (or ``k >= seq``) keeps every position. A prefill
  samples from its last position only: ``k = 1`` skips ``(seq - 1) x hidden x vocab``
  multiply-adds (SmolLM2, a 128-token chunk: 3.6 of its 6.0 GFLOP with the head).
- The chunks: every column of the head is its own dot product, so splitting the vocabulary
  changes no logit's math; each chunk reads at most :data:`CHUNK_BYTES` of weight. ONNX Runtime
  stops a terminated run between nodes, never inside one, and the head is the largest weight a
  decode step reads (SmolLM2 fp32: 113 MB, a fifth of the step): in chunks, a switch that
  terminates a step waits for at most one chunk rather than the whole head. Float chunks are
  ``Slice`` nodes over the head's own constant (ONNX Runtime folds them at load, and the
  file keeps sharing the tensor with the forward graph); ``MatMulNBits`` chunks are new
  initializers, the codes, scales and zero points split by output row.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

#: the graph input of :func:`keep_last_logits`
KEEP_INPUT = "logits_to_keep"
#: the most weight bytes one chunk of the head reads (about a millisecond of memory traffic)
CHUNK_BYTES = 16 << 20
#: chunk widths are multiples of this many vocabulary columns
CHUNK_ALIGN = 64


def keep_last_logits(model: onnx.ModelProto, output: str = "logits",
                     chunk_bytes: int | None = None) -> dict:
    """Rewrite the node producing graph output ``output`` (a ``MatMul`` with a constant right
    operand, or a ``com.microsoft.MatMulNBits`` with constant codes) as in the module docstring,
    adding the graph input ``logits_to_keep``. Returns ``{"input": "logits_to_keep",
    "chunks": n, "head_bytes": bytes}`` (n = 1: the head was small enough to stay whole).
    ValueError where the head is neither form. chunk_bytes: default :data:`CHUNK_BYTES`."""
    chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    head = producer.get(output)
    if head is None or not ((head.op_type == "MatMul" and head.domain in ("", "ai.onnx"))
                            or (head.op_type == "MatMulNBits"
                                and head.domain == "com.microsoft")):
        raise ValueError(f"{output!r} is not produced by a MatMul or MatMulNBits head")
    if KEEP_INPUT in {i.name for i in graph.input}:
        raise ValueError(f"the graph already has an input {KEEP_INPUT!r}")
    inits = {i.name: i for i in graph.initializer}
    prefix = f"{head.name or output}/keep"
    graph.input.append(helper.make_tensor_value_info(KEEP_INPUT, TensorProto.INT64, []))
    one = f"{prefix}/one"  # [1]: the shape of k as a 1-D tensor, and the axis of every Slice
    graph.initializer.extend([
        numpy_helper.from_array(np.array([1], np.int64), one),
        numpy_helper.from_array(np.array([np.iinfo(np.int64).max], np.int64), f"{prefix}/end"),
    ])
    kept = f"{prefix}/h"
    new = [
        helper.make_node("Reshape", [KEEP_INPUT, one], [f"{prefix}/k"], name=f"{prefix}/k"),
        helper.make_node("Neg", [f"{prefix}/k"], [f"{prefix}/start"], name=f"{prefix}/start"),
        helper.make_node("Slice", [head.input[0], f"{prefix}/start", f"{prefix}/end", one],
                         [kept], name=f"{prefix}/slice"),
    ]
    if head.op_type == "MatMul":
        chunks, head_bytes, nodes = _float_chunks(graph, head, kept, one, producer, inits,
                                                  chunk_bytes)
    else:
        chunks, head_bytes, nodes = _nbits_chunks(graph, head, kept, inits, chunk_bytes)
    if chunks == 1:
        nodes = [helper.make_node(head.op_type, [kept, *head.input[1:]], list(head.output),
                                  name=head.name, domain=head.domain)]
        nodes[0].attribute.extend(head.attribute)
    else:
        parts = [n.output[0] for n in nodes if n.op_type == head.op_type]
        nodes.append(helper.make_node("Concat", parts, [output], name=f"{prefix}/concat",
                                      axis=-1))
    body = list(graph.node)
    at = body.index(head)
    body[at:at + 1] = new + nodes
    del graph.node[:]
    graph.node.extend(body)
    return {"input": KEEP_INPUT, "chunks": chunks, "head_bytes": head_bytes}


def _bounds(columns: int, weight_bytes: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """Column ranges of the chunks: as few as keep each under ``chunk_bytes``, widths
    multiples of :data:`CHUNK_ALIGN` but the last."""
    n = max(1, math.ceil(weight_bytes / chunk_bytes))
    width = math.ceil(columns / n / CHUNK_ALIGN) * CHUNK_ALIGN
    return [(c, min(c + width, columns)) for c in range(0, columns, width)]


def _float_chunks(graph: onnx.GraphProto, head: onnx.NodeProto, kept: str, axis: str,
                  producer: dict, inits: dict, chunk_bytes: int
                  ) -> tuple[int, int, list[onnx.NodeProto]]:
    """``MatMul(h_k, W)``, ``W`` an initializer (hidden, vocab) or ``Transpose`` of one
    (vocab, hidden): ``Slice`` of ``W`` per chunk along its last axis (``axis``: the constant
    [1], which the positions' slice uses too)."""
    weight = head.input[1]
    if weight in inits:
        shape = list(inits[weight].dims)
        itemsize = helper.tensor_dtype_to_np_dtype(inits[weight].data_type).itemsize
    else:
        source = producer.get(weight)
        perm = [a.ints for a in source.attribute if a.name == "perm"] if source else []
        if (source is None or source.op_type != "Transpose" or source.input[0] not in inits
                or (perm and list(perm[0]) != [1, 0])):
            raise ValueError(f"head weight {weight!r} is not a constant (hidden, vocab)")
        tensor = inits[source.input[0]]
        shape = list(reversed(tensor.dims))
        itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    if len(shape) != 2:
        raise ValueError(f"head weight {weight!r} of shape {shape}: (hidden, vocab) expected")
    head_bytes = shape[0] * shape[1] * itemsize
    bounds = _bounds(shape[1], head_bytes, chunk_bytes)
    if len(bounds) == 1:
        return 1, head_bytes, []
    nodes = []
    for i, (lo, hi) in enumerate(bounds):
        name = f"{head.name or head.output[0]}/chunk{i}"
        graph.initializer.extend([numpy_helper.from_array(np.array([lo], np.int64), f"{name}/lo"),
                                  numpy_helper.from_array(np.array([hi], np.int64), f"{name}/hi")])
        nodes += [
            helper.make_node("Slice", [weight, f"{name}/lo", f"{name}/hi", axis],
                             [f"{name}/w"], name=f"{name}/w"),
            helper.make_node("MatMul", [kept, f"{name}/w"], [f"{name}/y"], name=name),
        ]
    return len(bounds), head_bytes, nodes


def _nbits_chunks(graph: onnx.GraphProto, head: onnx.NodeProto, kept: str, inits: dict,
                  chunk_bytes: int) -> tuple[int, int, list[onnx.NodeProto]]:
    """``MatMulNBits(h_k, B, scales[, zero_points])``: B (N, blocks, blob), scales and zero
    points per output row; each chunk's rows as new initializers, attribute N its width."""
    attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
    columns = int(attrs["N"])
    inputs = list(head.input[1:])
    if len(inputs) > 3 or any(n and n not in inits for n in inputs):
        raise ValueError(f"MatMulNBits head {head.name!r}: constant B, scales and zero points "
                         "expected (no g_idx or bias)")
    arrays = [numpy_helper.to_array(inits[n]) if n else None for n in inputs]
    head_bytes = int(arrays[0].nbytes)
    bounds = _bounds(columns, head_bytes, chunk_bytes)
    if len(bounds) == 1:
        return 1, head_bytes, []
    nodes = []
    for i, (lo, hi) in enumerate(bounds):
        name = f"{head.name or head.output[0]}/chunk{i}"
        names = []
        for j, (src, array) in enumerate(zip(inputs, arrays, strict=True)):
            if array is None:
                names.append("")
                continue
            rows = array.reshape(columns, -1)[lo:hi]
            part = rows.reshape((hi - lo, *array.shape[1:])) if j == 0 or array.ndim > 1 \
                else rows.reshape(-1)
            names.append(f"{src}/chunk{i}")
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(part),
                                                             names[-1]))
        node = helper.make_node("MatMulNBits", [kept, *names], [f"{name}/y"], name=name,
                                domain=head.domain)
        node.attribute.extend(helper.make_attribute(k, hi - lo if k == "N" else v)
                              for k, v in attrs.items())
        nodes.append(node)
    for name in {n for n in inputs if n}:  # the whole head's tensors, now unread
        if not any(name in node.input for node in graph.node if node is not head):
            graph.initializer.remove(inits[name])
    return len(bounds), head_bytes, nodes
