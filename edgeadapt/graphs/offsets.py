"""The affine int4 grid's offset term in an ONNX graph (onnx only, no torch): written by the
exporter (:func:`edgeadapt.export.onnx_quant.add_offset_terms`), handed to edgeadapt's kernel by
the runtime at load.

On an affine grid (``int4-affine``, :func:`edgeadapt.format.quant.affine_split`) every quantized
``y = x @ W^T`` is its codes' part plus an offset term, written in float so that the graph runs
on stock ONNX Runtime::

    S = MatMul(x, P)                       P (in, in / G): P[c, c // G] = 1   (once per x)
    y_i = Add(part_i, MatMul(S, O_i))      O_i = o_i^T (in / G, out_i), a constant

:func:`kernel_block_offsets` replaces, per ``x``, that ``MatMul`` and every reader's ``MatMul``
and ``Add`` (``2 n + 1`` nodes) by one ``edgeadapt.BlockOffsets(x, part_1, O_1, ...) -> y_1,
...`` (``edgeadapt/runtime/kernels/block_offsets.h``): the same sums, in float, for a fraction
of ONNX Runtime's per-node cost.
"""

from __future__ import annotations

import onnx
from onnx import helper

from edgeadapt.graphs.blocked import KERNEL_DOMAIN
from edgeadapt.graphs.values import consumers, sort_topologically

#: the names the exporter gives the block-sum matrices P (``<prefix>_<in>x<G>``)
BLOCK_SUMS = "edgeadapt_block_sums"
#: the offset op's name (in edgeadapt's domain)
OFFSETS_OP = "BlockOffsets"


def block_sums_name(inputs: int, group: int) -> str:
    """The name of the block-sum matrix ``P`` of ``inputs`` columns in blocks of ``group``."""
    return f"{BLOCK_SUMS}_{inputs}x{group}"


def kernel_block_offsets(model: onnx.ModelProto) -> int:
    """Replace every ``x``'s offset terms (module docstring) by one ``edgeadapt.BlockOffsets``
    node, in place, the nodes then re-sorted topologically (the node reads every reader's
    part, so it stands after the last of them). An ``x`` whose sums are read by anything but
    the pattern (a ``MatMul`` by a constant ``O``, read by one ``Add`` only) is left as it is.
    Returns how many offset terms were replaced."""
    graph = model.graph
    inits = {i.name for i in graph.initializer} - {i.name for i in graph.input}
    uses = consumers(graph)
    outputs = {o.name for o in graph.output}
    drop: set[int] = set()
    made = []
    replaced = 0
    for node in list(graph.node):
        if node.op_type != "MatMul" or not node.input[1].startswith(BLOCK_SUMS) \
                or node.input[1] not in inits or node.output[0] in outputs:
            continue
        terms = _terms(uses, node.output[0], inits, outputs)
        if not terms:
            continue
        ins = [node.input[0]]
        for mm, add in terms:
            part = add.input[1] if add.input[0] == mm.output[0] else add.input[0]
            ins += [part, mm.input[1]]
        made.append(helper.make_node(OFFSETS_OP, ins, [add.output[0] for _, add in terms],
                                     name=f"{node.name}/edgeadapt_offsets",
                                     domain=KERNEL_DOMAIN))
        drop |= {id(node)} | {id(n) for pair in terms for n in pair}
        replaced += len(terms)
    if not made:
        return 0
    kept = [n for n in graph.node if id(n) not in drop]
    del graph.node[:]
    graph.node.extend(kept + made)
    sort_topologically(graph)
    read = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer
                 if i.name.startswith(BLOCK_SUMS) and i.name not in read]:
        graph.initializer.remove(init)
    if not any(o.domain == KERNEL_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(KERNEL_DOMAIN, 1))
    return replaced


def _terms(uses, sums: str, inits: set[str], outputs: set[str]
           ) -> list[tuple[onnx.NodeProto, onnx.NodeProto]]:
    """The (offset MatMul, Add) of each reader of the block sums ``sums``, in graph order; []
    if anything else reads them or an offset is not a constant."""
    terms = []
    for mm, pos in uses.get(sums, []):
        if mm.op_type != "MatMul" or pos != 0 or mm.input[1] not in inits \
                or mm.output[0] in outputs:
            return []
        adds = uses.get(mm.output[0], [])
        if len(adds) != 1 or adds[0][0].op_type != "Add" or len(adds[0][0].input) != 2 \
                or adds[0][0].input[0] == adds[0][0].input[1]:
            return []
        terms.append((mm, adds[0][0]))
    return terms
