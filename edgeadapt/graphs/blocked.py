"""The ``blocked32`` rewrite of MatMul-read live weights (onnx + numpy only, no torch): written
by the exporter, undone or handed to edgeadapt's kernel by the runtime at load.

A live weight ``W (out, in)`` that the exporter found as MatMul's B operand ``X = W.T (in, out)``
is re-laid as ``Xb (out/32, in, 32)``, ``Xb[b, c, j] = W[32 b + j, c]``
(:mod:`edgeadapt.format.layout`, which also says why), and each reader ``y = MatMul(x, X)``
becomes

    xf = Reshape(x, [1, -1, in])                 one per x
    u  = MatMul(xf, Xb)                          (out/32, M, 32), M = prod(x.shape[:-1])
    t  = Transpose(u, perm=[1, 0, 2])            (M, out/32, 32)
    y  = Reshape(t, Concat(Shape(x)[:-1], [out]))

:func:`unblock_live_matmuls` undoes it for sessions that make the live weights constant: ONNX
Runtime prepacks only 2-D MatMul weights. :func:`kernel_blocked_matmuls` replaces each such
reader by one ``edgeadapt.BlockedMatMul(x, Xb)`` node for live sessions that have edgeadapt's
kernel (:mod:`edgeadapt.runtime.backends.onnxruntime.kernel`), which reads ``Xb`` in place where
MatMul copies it panel by panel on every call.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeadapt.errors import ExportError
from edgeadapt.format.layout import BLOCK, BLOCKED, TRANSPOSED, to_backend
from edgeadapt.graphs.head import CHUNK_BYTES
from edgeadapt.graphs.values import LiveWeight, all_value_names, consumers, live_input_name


def block_live_matmuls(model: onnx.ModelProto, live: dict[str, LiveWeight]
                       ) -> dict[str, LiveWeight]:
    """Re-lay as ``blocked32`` every live input that is ``transposed``, read only as the B
    operand of MatMul, with ``out % 32 == 0``; rewrite each such MatMul ``y = x @ X`` into

        xf = Reshape(x, [1, -1, in])            (one per x)
        u  = MatMul(xf, Xb)                     (out/32, M, 32), M = prod(x.shape[:-1])
        t  = Transpose(u, perm=[1, 0, 2])       (M, out/32, 32)
        y  = Reshape(t, Concat(Shape(x)[:-1], [out]))

    keeping the MatMul's node name. Other live inputs are returned unchanged. The numbers that
    motivate it are in :mod:`edgeadapt.format.layout`.
    """
    graph = model.graph
    uses = consumers(graph)
    inputs = {vi.name: vi for vi in graph.input}
    taken = all_value_names(graph)
    eligible: dict[str, tuple[str, int, int]] = {}  # input name -> (weight, in, out)
    result = dict(live)
    for wname, lw in live.items():
        readers = uses.get(lw.name, [])
        if lw.layout != TRANSPOSED or len(lw.shape) != 2 or lw.shape[1] % BLOCK or not readers \
                or any(n.op_type != "MatMul" or pos != 1 for n, pos in readers):
            continue
        new = live_input_name(wname, BLOCKED)
        if new in taken:
            raise ExportError(f"cannot name the blocked live input of {wname!r} {new!r}: the "
                              "graph already has a value of that name")
        inp, out = lw.shape
        eligible[lw.name] = (new, inp, out)
        result[wname] = LiveWeight(new, BLOCKED, (out // BLOCK, inp, BLOCK))
    if not eligible:
        return result
    consts: dict[str, np.ndarray] = {}
    flat: dict[str, str] = {}  # x -> its (1, M, in) reshape
    lead: dict[str, str] = {}  # x -> Shape(x)[:-1]
    target: dict[tuple[str, int], str] = {}  # (x, out) -> output shape
    nodes: list[onnx.NodeProto] = []

    def const(name: str, value: list[int]) -> str:
        consts.setdefault(name, np.array(value, dtype=np.int64))
        return name

    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in eligible:
            nodes.append(node)
            continue
        x, (new, inp, out), y = node.input[0], eligible[node.input[1]], node.output[0]
        base = node.name or y
        if x not in flat:
            flat[x] = f"{x}/edgeadapt_flat"
            nodes.append(helper.make_node("Reshape", [x, const(f"edgeadapt_flat_{inp}",
                                                               [1, -1, inp])], [flat[x]],
                                          name=f"{base}/flat"))
        if x not in lead:
            lead[x] = f"{x}/edgeadapt_lead"
            nodes.append(helper.make_node("Shape", [x], [lead[x]], end=-1, name=f"{base}/lead"))
        if (x, out) not in target:
            target[x, out] = f"{x}/edgeadapt_to{out}"
            nodes.append(helper.make_node("Concat", [lead[x], const(f"edgeadapt_dim_{out}",
                                                                    [out])],
                                          [target[x, out]], axis=0, name=f"{base}/target"))
        nodes += [helper.make_node("MatMul", [flat[x], new], [f"{y}/edgeadapt_blocks"],
                                   name=node.name),
                  helper.make_node("Transpose", [f"{y}/edgeadapt_blocks"], [f"{y}/edgeadapt_t"],
                                   perm=[1, 0, 2], name=f"{base}/unblock"),
                  helper.make_node("Reshape", [f"{y}/edgeadapt_t", target[x, out]], [y],
                                   name=f"{base}/shape")]
    del graph.node[:]
    graph.node.extend(nodes)
    for old, (new, inp, out) in eligible.items():
        graph.input.remove(inputs[old])
        graph.input.append(helper.make_tensor_value_info(new, TensorProto.FLOAT,
                                                         [out // BLOCK, inp, BLOCK]))
    existing = {i.name for i in graph.initializer}
    for name, value in consts.items():
        if name not in existing:
            graph.initializer.append(numpy_helper.from_array(value, name))
    return result


def _blocked_readers(graph: onnx.GraphProto, name: str, uses, producers
                     ) -> list[tuple[onnx.NodeProto, ...]]:
    """The readers of blocked32 input ``name`` as :func:`block_live_matmuls` wrote them: per
    reader (flatten Reshape, MatMul, Transpose, output Reshape); ExportError if one is not."""
    found = []
    for mm, pos in uses.get(name, []):
        try:
            (tr, _), = uses[mm.output[0]]
            (rs, _), = uses[tr.output[0]]
            flat = producers[mm.input[0]]
        except (KeyError, ValueError):
            raise ExportError(f"{name!r}: reader {mm.name!r} is not the blocked32 "
                              "pattern") from None
        if mm.op_type != "MatMul" or pos != 1 or tr.op_type != "Transpose" \
                or rs.op_type != "Reshape" or flat.op_type != "Reshape":
            raise ExportError(f"{name!r}: reader {mm.name!r} is not the blocked32 pattern")
        found.append((flat, mm, tr, rs))
    return found


def _rewrite_readers(graph: onnx.GraphProto, replace: dict[int, onnx.NodeProto],
                     drop: set[int]) -> None:
    """Put ``replace[id(MatMul)]`` in place of each pattern's MatMul, remove the ``drop``
    nodes, then the helper nodes (flatten, Shape, Concat) and shape constants nothing reads."""
    nodes = [replace.get(id(n), n) for n in graph.node if id(n) not in drop]
    outputs = {o.name for o in graph.output}
    while True:  # drop helper nodes nothing reads any more (flatten, Shape, Concat)
        read = {i for n in nodes for i in n.input} | outputs
        dead = [n for n in nodes if n.op_type in ("Reshape", "Shape", "Concat")
                and "edgeadapt_" in n.output[0] and not set(n.output) & read]
        if not dead:
            break
        nodes = [n for n in nodes if n not in dead]
    del graph.node[:]
    graph.node.extend(nodes)
    read = {i for n in nodes for i in n.input}
    for init in [i for i in graph.initializer
                 if i.name.startswith("edgeadapt_") and i.name not in read]:
        graph.initializer.remove(init)  # the shape constants of the dropped helpers


def _blocked_inputs(graph: onnx.GraphProto, names) -> dict[str, onnx.ValueInfoProto]:
    return {vi.name: vi for vi in graph.input if vi.name in set(names)
            and len(vi.type.tensor_type.shape.dim) == 3}


def unblock_live_matmuls(model: onnx.ModelProto, names: set[str] | list[str]
                         ) -> dict[str, str]:
    """Undo :func:`block_live_matmuls` for the named blocked32 graph inputs: each rewritten
    reader becomes ``y = MatMul(x, X_T)`` again, ``X_T`` a ``(in, out)`` graph input named like
    the input with ``.B32`` replaced by ``.T``; the helper nodes left unused are dropped.

    For sessions that make the live weights constant (repack mode, the benchmark's unfused
    variants): ONNX Runtime prepacks only a 2-D MatMul weight. Returns blocked name -> new name
    (the caller feeds :func:`to_backend_layout` ``(W, "transposed")`` under the new name).
    """
    graph = model.graph
    blocked = _blocked_inputs(graph, names)
    if not blocked:
        return {}
    producers = {o: n for n in graph.node for o in n.output}
    uses = consumers(graph)
    renamed: dict[str, str] = {}
    drop: set[int] = set()
    replace: dict[int, onnx.NodeProto] = {}
    for name, vi in blocked.items():
        nb, inp, blk = (d.dim_value for d in vi.type.tensor_type.shape.dim)
        new = live_input_name(name.removesuffix(live_input_name("", BLOCKED)), TRANSPOSED)
        for flat, mm, tr, rs in _blocked_readers(graph, name, uses, producers):
            replace[id(mm)] = helper.make_node("MatMul", [flat.input[0], new], [rs.output[0]],
                                               name=mm.name)
            drop.update((id(tr), id(rs)))
        renamed[name] = new
        graph.input.remove(vi)
        graph.input.append(helper.make_tensor_value_info(new, TensorProto.FLOAT,
                                                         [inp, nb * blk]))
    _rewrite_readers(graph, replace, drop)
    return renamed


#: the custom op of :func:`kernel_blocked_matmuls` (edgeadapt/runtime/kernels/blocked_matmul.cpp)
KERNEL_DOMAIN, KERNEL_OP = "edgeadapt", "BlockedMatMul"
#: its quantized form, ``y = edgeadapt.QBlockedMatMul(x, codes, scales)`` (codes int8 in the
#: blocked32 layout, scales ``(out/32, in/G, 32)``: :mod:`edgeadapt.format.quant`)
QKERNEL_OP = "QBlockedMatMul"
#: its int4 form, ``y = edgeadapt.Q4BlockedMatMul(x, packed, scales)`` (codes packed two per
#: byte, ``(out/32, in, 16)`` uint8: :mod:`edgeadapt.format.nibbles`; scales as above)
Q4KERNEL_OP = "Q4BlockedMatMul"


class KernelRewrite(NamedTuple):
    """What :func:`kernel_blocked_matmuls` did: ``replaced`` live readers, and the
    ``constants`` its nodes read (name -> blocked32 array), which the graph holds as
    placeholders (:func:`supplied_initializer`): give them to the session with
    ``SessionOptions.add_external_initializers``, which copies them in."""

    replaced: int
    constants: dict[str, np.ndarray]


def kernel_blocked_matmuls(model: onnx.ModelProto, names: set[str] | list[str],
                           base_dir: Path | None = None, every_constant: bool = False
                           ) -> KernelRewrite:
    """Replace the readers of the named blocked32 graph inputs (the pattern
    :func:`block_live_matmuls` wrote) by ``edgeadapt.BlockedMatMul`` nodes, which read the
    inputs in place (:mod:`edgeadapt.runtime.backends.onnxruntime.kernel`); the inputs keep
    their name and layout. Readers of one ``x`` become one node,

        y_1, ..., y_n = edgeadapt.BlockedMatMul(x, Xb_1, ..., Xb_n)       y_i = x @ X_i

    which every constant ``y = MatMul(x, C)`` of that ``x`` joins (:class:`ConstantMatrices`:
    ``C`` a float ``(in, out)`` initializer, ``out % 32 == 0``, its data read from
    ``base_dir`` where it is external and left as it is where that is None), re-laid in
    blocked32 as a supplied constant: a layer's q, k and v projections are one node and one
    parallel section instead of three (ONNX Runtime's per-node cost, and the wake-up of the
    threads, paid once). Nodes read at most one LM head chunk's bytes (:class:`ReaderGroups`)
    and stand where the first of their readers stood.

    every_constant: every such constant MatMul of the graph becomes a node too, those of one
    ``x`` together (a layer's gate and up). For the KV-cache decoder, whose steps are one
    token: there this kernel streams a weight faster than MLAS's prepacked GEMV, while at
    hundreds of rows on one thread MLAS's GEMM is a little faster
    (``experiments/constant_kernel_probe.py``; docs/generate.md, "Decode speed on ONNX
    Runtime")."""
    graph = model.graph
    blocked = _blocked_inputs(graph, names)
    producers = {o: n for n in graph.node for o in n.output}
    uses = consumers(graph)
    drop: set[int] = set()
    groups = ReaderGroups()
    for name in blocked:
        nbytes = 4 * math.prod(d.dim_value for d in blocked[name].type.tensor_type.shape.dim)
        for flat, mm, tr, rs in _blocked_readers(graph, name, uses, producers):
            groups.add(flat.input[0], KERNEL_OP, (mm, [name], rs.output[0]), nbytes)
            drop.update((id(tr), id(rs)))
    replaced = groups.count()
    live_xs = {x for x, _, _ in groups.nodes}
    inits = {i.name: i for i in graph.initializer}
    constant = ConstantMatrices(inits, producers, {i.name for i in graph.input}, base_dir)
    made: dict[str, np.ndarray] = {}
    for node in graph.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") \
                or not (every_constant or node.input[0] in live_xs):
            continue
        c = constant(node.input[1])
        if c is None or c.shape[1] % BLOCK or c.shape[1] == 0:
            continue
        name = f"{node.input[1]}/edgeadapt.B32"
        if name not in made:
            made[name] = np.ascontiguousarray(to_backend(c.T, BLOCKED))
        groups.add(node.input[0], KERNEL_OP, (node, [name], node.output[0]), c.nbytes)
    if not groups.nodes:
        return KernelRewrite(0, {})
    graph.initializer.extend(supplied_initializer(n, a) for n, a in made.items())
    _rewrite_readers(graph, merged_nodes(graph, groups.nodes, drop), drop)
    _drop_unread(graph, constant.derived, constant.read)
    if not any(o.domain == KERNEL_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(KERNEL_DOMAIN, 1))
    return KernelRewrite(replaced, made)


#: a reader to replace: (its node, the op inputs it adds after x, its output)
Reader = tuple[onnx.NodeProto, list[str], str]


class ReaderGroups:
    """The nodes a kernel rewrite makes: the readers of one ``x`` (for one op) gathered into
    one node while the weights it reads stay within :data:`edgeadapt.graphs.head.CHUNK_BYTES`
    (a layer's q, k and v; its gate and up), a new node past that (an LM head's chunks stay
    one node each, so that a terminated step still stops within one)."""

    def __init__(self) -> None:
        self.nodes: dict[tuple[str, str, int], list[Reader]] = {}
        self._open: dict[tuple[str, str], tuple[tuple[str, str, int], int]] = {}

    def add(self, x: str, op: str, reader: Reader, nbytes: int) -> None:
        """Add ``reader`` of ``x`` (its weight ``nbytes``) to the open node of ``(x, op)``,
        or to a new one where that would read more than CHUNK_BYTES."""
        key, used = self._open.get((x, op), (None, 0))
        if key is None or (used and used + nbytes > CHUNK_BYTES):
            key, used = (x, op, len(self.nodes)), 0
        self.nodes.setdefault(key, []).append(reader)
        self._open[x, op] = (key, used + nbytes)

    def count(self) -> int:
        """How many readers were added."""
        return sum(len(r) for r in self.nodes.values())


class ConstantMatrices:
    """``constant(name)``: the float ``(in, out)`` matrix a MatMul reads as ``name`` where it
    is a constant: an initializer that is not a graph input, or a ``Transpose`` (perm
    ``[1, 0]``) or ``Slice`` (constant starts, ends and axes, steps of 1) of one; None
    otherwise, and for external data without a ``base_dir``. ``read``: the initializers it
    read, each read once (an LM head's chunks share one tied embedding); ``derived``: the
    values it computed from them."""

    def __init__(self, inits: dict[str, onnx.TensorProto], producers: dict[str, onnx.NodeProto],
                 overridable: set[str], base_dir: Path | None) -> None:
        self.inits, self.producers, self.overridable = inits, producers, overridable
        self.base_dir = base_dir
        self.read: set[str] = set()
        self.derived: set[str] = set()
        self._seen: dict[str, np.ndarray | None] = {}

    def __call__(self, name: str) -> np.ndarray | None:
        c = self._array(name)
        return c if c is not None and c.ndim == 2 and c.dtype == np.float32 else None

    def _array(self, name: str) -> np.ndarray | None:
        if name not in self._seen:
            self._seen[name] = self._resolve(name)
        return self._seen[name]

    def _resolve(self, name: str) -> np.ndarray | None:
        if name in self.overridable:
            return None
        if name in self.inits:
            c = constant_array(self.inits[name], self.base_dir)
            if c is not None:
                self.read.add(name)
            return c
        node = self.producers.get(name)
        if node is None or node.domain not in ("", "ai.onnx") or not node.input:
            return None
        source = self._array(node.input[0])
        if source is None or source.ndim != 2:
            return None
        self.derived.add(name)
        if node.op_type == "Transpose":
            perm = [list(a.ints) for a in node.attribute if a.name == "perm"]
            return source.T if not perm or perm[0] == [1, 0] else None
        if node.op_type != "Slice" or len(node.input) not in (3, 4) \
                or not all(i in self.inits for i in node.input[1:]):
            return None
        starts, ends, *axes = (numpy_helper.to_array(self.inits[i]) for i in node.input[1:])
        axes = axes[0] if axes else np.arange(len(starts))
        if not len(starts) == len(ends) == len(axes):
            return None
        index = [slice(None)] * 2
        for a, lo, hi in zip(axes.tolist(), starts.tolist(), ends.tolist(), strict=True):
            if a not in (-2, -1, 0, 1):
                return None
            index[a % 2] = slice(lo, hi)
        return source[tuple(index)]


def supplied_initializer(name: str, array: np.ndarray) -> onnx.TensorProto:
    """A placeholder initializer of ``array``'s type and shape whose data the session is given
    (``SessionOptions.add_external_initializers``): marked external, at a location that is
    never read, so the graph stays small and no file is written."""
    tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
                         dims=array.shape, data_location=TensorProto.EXTERNAL)
    for key, value in (("location", SUPPLIED), ("offset", "0"), ("length", str(array.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


#: the external-data location of :func:`supplied_initializer`'s placeholders
SUPPLIED = "edgeadapt-supplied-at-load"


def _drop_unread(graph: onnx.GraphProto, derived: set[str], names: set[str]) -> None:
    """Remove the nodes that compute only ``derived`` values no node reads any more (an LM
    head's Slice and Transpose of a constant, now read as blocked copies), then the
    initializers among ``names`` and those the removed nodes read (a Slice's bounds) that no
    node reads any more."""
    outputs = {o.name for o in graph.output}
    names = set(names)
    while True:
        read = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if set(n.output) <= derived and not set(n.output) & read]
        if not dead:
            break
        for n in dead:
            names.update(n.input)
            graph.node.remove(n)
    for init in [i for i in graph.initializer if i.name in names and i.name not in read]:
        graph.initializer.remove(init)


def merged_nodes(graph: onnx.GraphProto, groups: dict[tuple[str, str, int], list[Reader]],
                 drop: set[int]) -> dict[int, onnx.NodeProto]:
    """One ``op`` node per ``(x, op, ...)`` group of readers, ``op(x, *inputs of each reader in
    graph order) -> their outputs``, to stand where the group's first reader stood: returns
    {id(that reader): the node} for :func:`_rewrite_readers`, the other readers added to
    ``drop``."""
    order = {id(n): i for i, n in enumerate(graph.node)}
    replace = {}
    for (x, op, *_), readers in groups.items():
        readers.sort(key=lambda r: order[id(r[0])])
        replace[id(readers[0][0])] = helper.make_node(
            op, [x] + [i for _, ins, _ in readers for i in ins], [y for _, _, y in readers],
            name=readers[0][0].name, domain=KERNEL_DOMAIN)
        drop.update(id(n) for n, _, _ in readers[1:])
    return replace


def constant_array(tensor: onnx.TensorProto, base_dir: Path | None) -> np.ndarray | None:
    """An initializer's values, read from ``base_dir`` where its data is external; None for
    external data without a folder (the graph was read without its data and the caller
    leaves the tensor as it is)."""
    if tensor.data_location == TensorProto.EXTERNAL:
        return None if base_dir is None else numpy_helper.to_array(tensor, str(base_dir))
    return numpy_helper.to_array(tensor)
