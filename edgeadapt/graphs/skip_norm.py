"""Residual add + RMS norm as one ``SkipSimplifiedLayerNormalization`` (onnx only, no torch).

A Llama block adds each sublayer's output to the residual stream and normalises the sum for
the next sublayer::

    h = Add(a, b)                                 the residual stream, read again later
    y = SimplifiedLayerNormalization(h, w)        y = w * h / sqrt(mean(h^2) + eps)

ONNX Runtime's CPU optimizer does not fuse the pair; its contrib op
``com.microsoft.SkipSimplifiedLayerNormalization(a, b, w)`` computes both in one pass, ``y`` as
output 0 and ``h`` as output 3 (``input_skip_bias_sum``), so a decode step runs one kernel
instead of two per norm (60 fewer on SmolLM2's 30 blocks), as onnxruntime-genai's graphs do.
"""

from __future__ import annotations

import onnx
from onnx import helper

from edgeadapt.graphs.values import consumers

DOMAIN = "com.microsoft"


def fuse_skip_norms(model: onnx.ModelProto) -> int:
    """Rewrite every ``Add(a, b) -> SimplifiedLayerNormalization(h, w)`` pair into one
    ``SkipSimplifiedLayerNormalization(a, b, w)`` at the Add's place (``epsilon`` kept; other
    readers of the sum read the fused node's output 3). Left alone: an Add with a constant
    operand (a bias, maybe broadcast: the fused op adds equal shapes), a sum that is a graph
    output or read by a second norm, a norm whose weight is computed or whose extra outputs
    are read. Returns the number of pairs fused."""
    graph = model.graph
    readers = consumers(graph)
    producer = {out: node for node in graph.node for out in node.output}
    constant = {i.name for i in graph.initializer} | {
        n.output[0] for n in graph.node if n.op_type == "Constant"}
    outputs = {o.name for o in graph.output}
    fused: dict[int, onnx.NodeProto] = {}  # id(add) -> the fused node
    norms: set[int] = set()
    for norm in graph.node:
        if (norm.op_type != "SimplifiedLayerNormalization" or len(norm.input) != 2
                or norm.input[1] in producer or any(norm.output[1:])):
            continue
        add = producer.get(norm.input[0])
        if (add is None or add.op_type != "Add" or id(add) in fused
                or add.output[0] in outputs or any(i in constant for i in add.input)):
            continue
        if sum(r.op_type == "SimplifiedLayerNormalization"
               for r, _ in readers.get(add.output[0], [])) != 1:
            continue
        node = helper.make_node(
            "SkipSimplifiedLayerNormalization", [add.input[0], add.input[1], norm.input[1]],
            [norm.output[0], "", "", add.output[0]], name=f"{norm.name or norm.output[0]}/skip",
            domain=DOMAIN)
        node.attribute.extend(a for a in norm.attribute if a.name == "epsilon")
        fused[id(add)] = node
        norms.add(id(norm))
    if fused:
        nodes = [fused.get(id(n), n) for n in graph.node if id(n) not in norms]
        del graph.node[:]
        graph.node.extend(nodes)
        if not any(o.domain == DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return len(fused)
