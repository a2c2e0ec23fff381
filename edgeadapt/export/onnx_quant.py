"""Quantized ONNX graphs (``--weights int8|int4``): the rest of the weights on ONNX Runtime's own
quantized kernels, the live weights as codes + scales read in place by edgeadapt's kernel.

Which weights: :func:`edgeadapt.models.targets.quantized_weight_names` (every Linear in the
transformer blocks, and a causal LM's head). On the grids of :mod:`edgeadapt.format.quant`
(blocks of 32 input columns, 8 or 4 bits):

- the *rest* (quantized, not live) is quantized by ONNX Runtime's own tool, exactly as a user of
  the backend would quantize the whole model: ``MatMulNBitsQuantizer`` (symmetric, blocks of
  32, ``accuracy_level`` 4: activations quantized to int8 per block of the row, as
  onnxruntime-genai's CPU int4 models run). Those weights are constants the backend packs.
- the *live* weights become codes + scales graph inputs (:mod:`edgeadapt.graphs.quantized`),
  on the same grid (tests/test_quant_grid.py), with float activations (weight-only) in the
  graph's own dequantization: the runtime edits the codes in place. edgeadapt's ONNX Runtime
  kernel, which reads them at load, computes them with the rest's activations (int8 per block
  at level 4: ``graphs.quantized.stock_accuracy_level``).

Not ``quantize_dynamic`` for int8: it quantizes each activation tensor to uint8 with a single
scale, which SmolLM2's activations do not survive (docs/quantized.md).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from edgeadapt.errors import ExportError
from edgeadapt.export.onnx_graph import digest
from edgeadapt.format.fingerprint import weight_sha256
from edgeadapt.format.layout import BLOCKED, to_backend
from edgeadapt.format.quant import Grid, affine_split, grid, offset_weight
from edgeadapt.graphs.offsets import block_sums_name
from edgeadapt.graphs.quantized import dequantize_live_inputs
from edgeadapt.graphs.values import LiveWeight, consumers
from edgeadapt.models import LoadedModel
from edgeadapt.models.targets import quantized_weight_grids

#: the export's check of a quantized graph (its MatMulNBits with float activations) against
#: PyTorch carrying the dequantized weights: SmolLM2 passes at 5e-6 (int8) and 8e-5 (int4, its
#: 30 layers and larger steps), tiny models at 3e-7, while the check's edit of the codes moves
#: the output by 0.27-0.31 (SmolLM2), 9e-4 (tiny MiniLM, whose fp32 check moves 4e-4)
QUANT_RTOL = 3e-4
#: MatMulNBits' accuracy level for the rest: int8 activations per block (onnxruntime-genai's
#: CPU int4 models run so)
ACCURACY_LEVEL = 4


def constant_matmuls(model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> list[str]:
    """Names of the MatMul nodes whose B operand is an initializer holding one of ``weights``
    (torch name -> ``(out, in)``) transposed, as torch's exporter writes a Linear
    (:func:`matmul_readers`)."""
    return sorted({node.name for nodes in matmul_readers(model, weights).values()
                   for node in nodes})


def matmul_readers(model: onnx.ModelProto, weights: dict[str, np.ndarray]
                   ) -> dict[str, list[onnx.NodeProto]]:
    """Per weight of ``weights`` (torch name -> ``(out, in)``) the MatMul nodes whose B operand
    is an initializer holding it transposed, as torch's exporter writes a Linear. A weight
    read through ``Transpose`` of an initializer shared with another reader (a tied LM head:
    the embedding's ``Gather``) gets its own transposed initializer ``<w>.T`` first, so it can
    be quantized alone. ExportError for a weight no MatMul reads either way (it would silently
    stay fp32) or a reader without a name."""
    graph = model.graph
    uses = consumers(graph)
    by_hash: dict[str, list[str]] = defaultdict(list)
    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT and len(init.dims) == 2 and init.name in uses:
            by_hash[digest(numpy_helper.to_array(init))].append(init.name)
    found = {}
    for w, arr in weights.items():
        readers = [node for init in by_hash.get(digest(np.ascontiguousarray(arr.T)), [])
                   for node, pos in uses[init] if node.op_type == "MatMul" and pos == 1]
        if not readers:
            readers = _untie(graph, w, arr, by_hash.get(digest(np.ascontiguousarray(arr)), []),
                             uses)
        if not readers:
            raise ExportError(f"weight {w!r}: no MatMul reads it as a constant (in, out) "
                              "operand; it cannot be quantized")
        for node in readers:
            if not node.name:
                raise ExportError(f"weight {w!r}: its MatMul has no name to quantize it by")
        found[w] = readers
    return found


def add_offset_terms(model: onnx.ModelProto, weights: dict[str, np.ndarray],
                     shifted: dict[str, np.ndarray], offsets: dict[str, np.ndarray],
                     group: int) -> None:
    """Split the affine offsets off ``weights`` in the graph, in place
    (:func:`edgeadapt.format.quant.affine_split`): every MatMul ``y = x @ W^T`` reading one of
    them (torch name -> fp32 ``(out, in)``) reads ``W'^T`` (``shifted``) instead, and gains the
    offset term in float32::

        y = x @ W'^T + (x @ P) @ o^T        P (in, in / G): P[c, c // G] = 1 (block sums)

    with ``o`` (``offsets``, ``(out, in / G)``) a constant ``<w>.offsets.T``; ``x @ P`` is
    computed once per input. The MatMul keeps its name (the quantizer and the live-weight
    rewrites find it as before); its result is renamed and the ``Add`` writes ``y``."""
    graph = model.graph
    readers = matmul_readers(model, weights)
    uses = consumers(graph)
    inits = {i.name: i for i in graph.initializer}
    consts: dict[str, np.ndarray] = {}
    position = {id(n): i for i, n in enumerate(graph.node)}
    pending = []
    for w, nodes in readers.items():
        reading = {id(n) for n in nodes}
        for b in {n.input[1] for n in nodes}:
            value = numpy_helper.from_array(np.ascontiguousarray(shifted[w].T), b)
            if all(id(n) in reading for n, _ in uses[b]):
                inits[b].CopyFrom(value)
            else:  # the initializer has other readers: the MatMuls get their own
                value.name = f"{b}.affine"
                consts[value.name] = numpy_helper.to_array(value)
                for n in nodes:
                    if n.input[1] == b:
                        n.input[1] = value.name
        consts[f"{w}.offsets.T"] = np.ascontiguousarray(offsets[w].T)
        inp = int(shifted[w].shape[1])
        p_name = block_sums_name(inp, group)
        if p_name not in consts:
            consts[p_name] = np.kron(np.eye(inp // group, dtype=np.float32),
                                     np.ones((group, 1), np.float32))
        pending += [(position[id(n)], n, f"{w}.offsets.T", p_name) for n in nodes]
    after: dict[int, list[onnx.NodeProto]] = defaultdict(list)
    sums: dict[str, str] = {}
    for _, node, o_name, p_name in sorted(pending, key=lambda t: t[0]):
        x, y = node.input[0], node.output[0]
        new = []
        if x not in sums:  # before the first reader of x in graph order
            sums[x] = f"{x}/edgeadapt_block_sums"
            new.append(helper.make_node("MatMul", [x, p_name], [sums[x]],
                                        name=f"{node.name}/block_sums"))
        part = f"{y}/edgeadapt_codes_part"
        node.output[0] = part
        new += [helper.make_node("MatMul", [sums[x], o_name], [f"{y}/edgeadapt_offset"],
                                 name=f"{node.name}/offset"),
                helper.make_node("Add", [part, f"{y}/edgeadapt_offset"], [y],
                                 name=f"{node.name}/offset_add")]
        after[id(node)] += new
    graph.initializer.extend(numpy_helper.from_array(v, n) for n, v in consts.items())
    nodes = list(graph.node)
    del graph.node[:]
    for node in nodes:
        graph.node.append(node)
        graph.node.extend(after.get(id(node), []))


def _untie(graph: onnx.GraphProto, w: str, arr: np.ndarray, holders: list[str], uses
           ) -> list[onnx.NodeProto]:
    """The MatMuls reading ``Transpose(init)`` of an initializer in ``holders`` (holding
    ``arr`` as-is), rewired to a new initializer ``<w>.T = arr.T``; the Transposes left
    unread are removed."""
    readers, dead = [], []
    for init in holders:
        for tr, _ in uses[init]:
            if tr.op_type != "Transpose" or [a.ints for a in tr.attribute if a.name == "perm"] \
                    not in ([[1, 0]], []):
                continue
            mms = [(n, p) for n, p in uses[tr.output[0]]]
            if mms and all(n.op_type == "MatMul" and p == 1 for n, p in mms):
                readers += [n for n, _ in mms]
                dead.append(tr)
    if readers:
        name = f"{w}.T"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(arr.T), name))
        for node in readers:
            node.input[1] = name
        for tr in dead:
            graph.node.remove(tr)
    return readers


def quantize_rest(model: onnx.ModelProto, nodes: list[str], precision: str,
                  symmetric: bool = True) -> onnx.ModelProto:
    """``model`` with the MatMul ``nodes`` quantized by ONNX Runtime's ``MatMulNBitsQuantizer``
    on ``precision``'s grid (module docstring); a new ModelProto, its weights in memory.
    ``symmetric=False``: the tool's asymmetric form (a uint8 zero point per block; the bench's
    stock peer of an affine grid, not edgeadapt's own grid)."""
    if not nodes:
        return model
    # the tool infers shapes strictly; the value infos torch wrote predate edgeadapt's rewrites
    del model.graph.value_info[:]
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    g = grid(precision)
    chosen = set(nodes)  # nodes_to_include only adds to the op types it quantizes anyway
    tool = MatMulNBitsQuantizer(model, bits=g.bits, block_size=g.group, is_symmetric=symmetric,
                                accuracy_level=ACCURACY_LEVEL, op_types_to_quantize=("MatMul",),
                                nodes_to_exclude=[n.name for n in model.graph.node
                                                  if n.name not in chosen])
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(
        logging.WARNING)
    tool.process()
    return tool.model.model


def quantize_by_grid(model: onnx.ModelProto, weights: dict[str, np.ndarray],
                     grids: dict[str, Grid], stock: bool = False) -> onnx.ModelProto:
    """``model`` with the constant MatMuls of ``weights`` (torch name -> ``(out, in)``, as the
    graph holds them) quantized by :func:`quantize_rest`, once per grid of ``grids`` (torch
    name -> grid). An affine grid's weights go on the tool's symmetric grid (they are ``W'`` by
    then, :meth:`QuantPlan.split_offsets`), or with ``stock`` on its asymmetric one (the
    bench's stock peer, which quantizes the unshifted weights)."""
    groups: dict[Grid, dict[str, np.ndarray]] = defaultdict(dict)
    for w, a in weights.items():
        groups[grids[w]][w] = a
    for g, group in groups.items():
        model = quantize_rest(model, constant_matmuls(model, group), g.name,
                              symmetric=not (stock and g.affine))
    return model


def quantize_live(model: onnx.ModelProto, live: dict[str, LiveWeight],
                  weights: dict[str, np.ndarray], precision: str
                  ) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """Make the blocked32 live inputs of ``weights`` (torch name -> fp32 ``(out, in)``) codes +
    scales on ``precision``'s grid (:func:`edgeadapt.graphs.quantized.dequantize_live_inputs`).
    Returns per weight its bundle entry ``{"name": codes input, "layout": "blocked32",
    "shape", "quant": {"grid", "scales", "scales_shape", "codes_sha256"}}`` and the base values
    by input name
    (codes int8 and scales float32, both blocked32)."""
    g = grid(precision)
    groups = {w: g.group_size(arr.shape[1]) for w, arr in weights.items()}
    inputs = dequantize_live_inputs(model, live, groups)
    entries, values = {}, {}
    for w, arr in weights.items():
        codes, scales = g.quantize(arr)
        q = inputs[w]
        values[q.codes] = to_backend(codes, BLOCKED)
        values[q.scales] = to_backend(scales, BLOCKED)
        entries[w] = {"name": q.codes, "layout": BLOCKED, "shape": list(values[q.codes].shape),
                      "quant": {"grid": g.name, "scales": q.scales,
                                "scales_shape": list(scales.shape),
                                "codes_sha256": weight_sha256(codes)}}
    return entries, values


@dataclass
class QuantPlan:
    """What a quantized export does to one model: ``weights``, every quantized weight (torch
    name -> fp32 ``(out, in)``, a tied LM head under its own module's name) as it goes onto its
    grid in ``grids`` (``W'`` on an affine grid; :func:`edgeadapt.models.targets.
    quantized_weight_grids`: ``grid``, the precision's, for all but a head the grid sends
    elsewhere), of which ``live`` are live (codes + scales inputs). The weights on an affine
    grid also have ``offsets`` (``(out, in // G)``) and ``originals`` (the weights before the
    split, to find them in the traced graph)."""

    grid: Grid
    weights: dict[str, np.ndarray]
    live: list[str]
    grids: dict[str, Grid]
    offsets: dict[str, np.ndarray] = field(default_factory=dict)
    originals: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def of(cls, lm: LoadedModel, live_weights: list[str], precision: str) -> QuantPlan | None:
        """The plan for ``precision`` (None for fp32); ConfigError for an unknown one."""
        if precision == "fp32":
            return None
        grids = quantized_weight_grids(lm.model, lm.kind, precision, live=live_weights)
        weights = {w: _module_weight(lm.model, w).detach().float().cpu().numpy().copy()
                   for w in grids}
        split = {w: affine_split(a, grids[w]) for w, a in weights.items() if grids[w].affine}
        return cls(grid(precision), {w: split[w][0] if w in split else a
                                     for w, a in weights.items()},
                   [w for w in live_weights if w in weights], grids,
                   {w: p[1] for w, p in split.items()},
                   {w: weights[w] for w in split})

    def _held(self, w: str) -> np.ndarray:
        """What the bundle holds of weight ``w``: ``q * s`` (``+ O``, affine)."""
        g = self.grids[w]
        held = g.dequantize(*g.quantize(self.weights[w]))
        if w in self.offsets:
            held = held + offset_weight(self.offsets[w], g, held.shape)
        return held

    def dequantized(self) -> dict[str, np.ndarray]:
        """The quantized weights as the bundle holds them (:meth:`_held`)."""
        return {w: self._held(w) for w in self.weights}

    def live_values(self, weights_np: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``weights_np`` (the live weights) with the quantized ones as the bundle holds them."""
        return {w: (self._held(w) if w in self.live else a) for w, a in weights_np.items()}

    def steps(self) -> dict[str, tuple[np.ndarray, np.ndarray, int, int]]:
        """Per quantized live weight (codes, per-entry scales (out, in), qmin, qmax)."""
        out = {}
        for w in self.live:
            g = self.grids[w]
            codes, scales = g.quantize(self.weights[w])
            out[w] = (codes, g.scale_of(scales, codes.shape), g.qmin, g.qmax)
        return out

    def split_offsets(self, model: onnx.ModelProto, weights_np: dict[str, np.ndarray]
                      ) -> dict[str, np.ndarray]:
        """Move the affine grids' offsets out of the traced ``model``'s weights
        (:func:`add_offset_terms`) and return ``weights_np`` (the live weights) with those
        weights as ``W'``; without affine weights both unchanged. Call before the live weights
        are located: they are found by value."""
        if not self.offsets:
            return weights_np
        add_offset_terms(model, self.originals, self.weights, self.offsets, self.grid.group)
        return {w: (self.weights[w] if w in self.offsets else a) for w, a in weights_np.items()}

    def apply(self, model: onnx.ModelProto, live: dict[str, LiveWeight],
              entries: dict[str, dict], values: dict[str, np.ndarray]
              ) -> tuple[onnx.ModelProto, dict[str, dict], dict[str, np.ndarray]]:
        """Quantize ``model``: the rest by ONNX Runtime's tool (:func:`quantize_rest`, once per
        grid), the live ones as codes + scales (:func:`quantize_live`). ``entries`` /
        ``values``: the float graph's live entries and base values (by input name). Returns the
        new model and both with the quantized weights' replaced."""
        model = quantize_by_grid(model, {w: a for w, a in self.weights.items()
                                         if w not in live}, self.grids)
        q_entries, q_values = {}, {}
        for name in {self.grids[w].name for w in self.live}:
            e, v = quantize_live(model, live, {w: self.weights[w] for w in self.live
                                               if self.grids[w].name == name}, name)
            q_entries |= e
            q_values |= v
        gone = {entries[w]["name"] for w in q_entries}
        return (model, {**entries, **q_entries},
                {**{k: v for k, v in values.items() if k not in gone}, **q_values})


@contextmanager
def float_activations(path: Path) -> Iterator[Path]:
    """A copy of the ONNX graph at ``path`` whose ``MatMulNBits`` nodes compute with float
    activations (``accuracy_level`` 0: the weights dequantized, a float GEMM), written beside
    it (sharing its external data) and removed afterwards. The export checks this copy: with
    int8 activations (level 4) a float difference that moves one activation across a rounding
    boundary changes it by a whole step, and such steps compound through the layers (SmolLM2:
    1e-2 to 6e-2 relative between two graphs that differ only in float summation order), so
    only the float form can be held to a tolerance that catches a wrong weight."""
    model = onnx.load(str(path), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            for attr in node.attribute:
                if attr.name == "accuracy_level":
                    attr.i = 0
    copy = path.with_name(f".{path.stem}.float-activations.onnx")
    onnx.save(model, str(copy))
    try:
        yield copy
    finally:
        copy.unlink(missing_ok=True)


def _module_weight(model: torch.nn.Module, name: str) -> torch.nn.Parameter:
    return model.get_submodule(name.removesuffix(".weight")).weight


@contextmanager
def dequantized(model: torch.nn.Module, plan: QuantPlan | None) -> Iterator[None]:
    """``model`` computing with the plan's dequantized weights (each module gets a parameter
    of its own, so a tied LM head changes without its embedding), restored after."""
    if plan is None:
        yield
        return
    saved = {}
    try:
        for w, arr in plan.dequantized().items():
            module = model.get_submodule(w.removesuffix(".weight"))
            saved[w] = (module, module.weight)
            module.weight = torch.nn.Parameter(torch.from_numpy(arr), requires_grad=False)
        yield
    finally:
        for module, weight in saved.values():
            module.weight = weight
