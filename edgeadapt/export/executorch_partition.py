"""A selective XNNPACK partition: linears whose weight is a *buffer* read it at run time, all
other linears keep constant weights that XNNPACK packs once at load.

XNNPACK's ``force_non_static_weights_for_f32_linear`` flag is global; here it is decided per
node inside ``get_deps``: true exactly when the weight argument traces back to a placeholder
listed in ``ep.graph_signature.inputs_to_buffers`` — or, for ``mm``, when the *left* operand
does (the ``weight-left`` form, ``(W x^T)^T``, :mod:`edgeadapt.export.executorch_live_form`:
its right operand x^T is an activation, dynamic by nature). The exporter registers only the live
(adaptable) weights as buffers, so only they stay editable (see BACKENDS.md, "Only the adapted
weights live").
"""

from __future__ import annotations

import torch
from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
from executorch.backends.xnnpack.partition.config.gemm_configs import (
    AddmmConfig,
    LinearConfig,
    MMConfig,
)
from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
from torch.export import ExportedProgram


def weight_placeholder(node: torch.fx.Node, weight_idx: int) -> torch.fx.Node | None:
    """The placeholder a GEMM's weight argument comes from (through permutes / views), if any."""
    arg = node.args[weight_idx] if weight_idx < len(node.args) else None
    while isinstance(arg, torch.fx.Node) and arg.op != "placeholder" and arg.all_input_nodes:
        arg = arg.all_input_nodes[0]
    return arg if isinstance(arg, torch.fx.Node) and arg.op == "placeholder" else None


def weight_is_buffer(node: torch.fx.Node, weight_idx: int, ep: ExportedProgram) -> bool:
    """True when the GEMM's weight is a buffer of ``ep`` (a live weight)."""
    ph = weight_placeholder(node, weight_idx)
    return ph is not None and ph.name in ep.graph_signature.inputs_to_buffers


def _selective(base: type) -> type:
    class Selective(base):  # type: ignore[misc, valid-type]
        def get_deps(self, node: torch.fx.Node, ep: ExportedProgram):
            self.force_non_static_weights_for_f32_linear = weight_is_buffer(
                node, self.weight_idx, ep) or (base is MMConfig and weight_is_buffer(node, 0, ep))
            return super().get_deps(node, ep)

    Selective.__name__ = Selective.__qualname__ = f"Selective{base.__name__}"
    return Selective


SELECTIVE_CONFIGS = [
    _selective(c) if c in (LinearConfig, AddmmConfig, MMConfig) else c
    for c in ALL_PARTITIONER_CONFIGS
]


def selective_partitioner() -> XnnpackPartitioner:
    """An XNNPACK partitioner with dynamic weights only where the weight is a buffer."""
    return XnnpackPartitioner(configs=SELECTIVE_CONFIGS)
