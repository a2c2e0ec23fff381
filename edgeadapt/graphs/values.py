"""Where values sit in an ONNX graph and who reads them (onnx only, no torch): the
:class:`LiveWeight` record the exporter and the blocked32 rewrite pass around, the readers of
every value (:func:`consumers`), the graph input names of live weights
(:func:`live_input_name`), and a stable topological order for rewritten graphs
(:func:`sort_topologically`)."""

from __future__ import annotations

import heapq
from collections import defaultdict
from dataclasses import dataclass

import onnx

from edgeadapt.format.layout import BLOCKED, TRANSPOSED


@dataclass(frozen=True)
class LiveWeight:
    """Where one torch weight lives in the graph: initializer/input ``name``, its ``layout``
    (``"as-is"``, ``"transposed"`` or ``"blocked32"``) and the backend ``shape``."""

    name: str
    layout: str
    shape: tuple[int, ...]


def consumers(graph: onnx.GraphProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    """Value name -> (node, input position) for every top-level node; names read inside
    subgraphs are recorded with node None-like position -1 on their parent node."""
    uses: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
    for node in graph.node:
        for pos, name in enumerate(node.input):
            if name:
                uses[name].append((node, pos))
        for attr in node.attribute:
            for sub in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                for sub_name in _names_read(sub):
                    uses[sub_name].append((node, -1))
    return uses


def _names_read(graph: onnx.GraphProto) -> set[str]:
    names: set[str] = set()
    for node in graph.node:
        names.update(n for n in node.input if n)
        for attr in node.attribute:
            for sub in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                names |= _names_read(sub)
    return names


def live_input_name(weight_name: str, layout: str) -> str:
    """Graph input name of a live weight: the torch name, plus ``.T`` when transposed and
    ``.B32`` when blocked32."""
    return weight_name + {TRANSPOSED: ".T", BLOCKED: ".B32"}.get(layout, "")


def all_value_names(graph: onnx.GraphProto) -> set[str]:
    """Every name the top-level graph uses: inputs, initializers, node inputs and outputs."""
    names = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
    return names


def sort_topologically(graph: onnx.GraphProto) -> None:
    """Order the top-level nodes so that each comes after the producers of what it reads
    (names read inside its subgraphs included), in place; nodes keep their relative order
    where nothing forces another (a stable Kahn's sort). ValueError for a cycle."""
    nodes = list(graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    waiting = [0] * len(nodes)
    readers: dict[int, list[int]] = defaultdict(list)
    for i, node in enumerate(nodes):
        reads = set(node.input)
        for attr in node.attribute:
            for sub in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                reads |= _names_read(sub)
        before = {producer[name] for name in reads if name in producer} - {i}
        waiting[i] = len(before)
        for j in before:
            readers[j].append(i)
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for j in readers[i]:
            waiting[j] -= 1
            if waiting[j] == 0:
                heapq.heappush(ready, j)
    if len(order) != len(nodes):
        raise ValueError("the graph has a cycle")
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)
