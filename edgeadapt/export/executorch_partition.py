"""A selective XNNPACK partition: linears whose weight is a *buffer* read it at run time, all
other linears keep constant weights that XNNPACK packs once at load.

XNNPACK's ``force_non_static_weights_for_f32_linear`` flag is global; here it is decided per
node inside ``get_deps``: true exactly when the weight argument traces back to a placeholder
listed in ``ep.graph_signature.inputs_to_buffers`` — or, for ``mm``, when the *left* operand
does (the ``weight-left`` form, ``(W x^T)^T``, :mod:`edgeadapt.export.executorch_live_form`:
its right operand x^T is an activation, dynamic by nature). The exporter registers only the live
(adaptable) weights as buffers, so only they stay editable (see BACKENDS.md, "Only the adapted
weights live").

A decoder's MLP GEMMs are each a delegate call of their own (:func:`mlp_partitioner`, given
before the selective one): XNNPACK merges whatever it can into one call, and a call cannot be
stopped part way, so a switch that lands on a prefill chunk shares the cores with the whole call
in flight. Left to the selective partitioner, a layer's MLP (three GEMMs over up to 128 tokens,
with the norms and the residual add) is one call.
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


def _modules(node: torch.fx.Node) -> list[str]:
    """Class names of the modules ``node`` was traced in, outermost first."""
    return [str(t).rsplit(".", 1)[-1].strip("'>")
            for _, t in (node.meta.get("nn_module_stack") or {}).values()]


def _in_mlp(base: type) -> type:
    class InMLP(base):  # type: ignore[misc, valid-type]
        def check_constraints(self, node: torch.fx.Node, ep: ExportedProgram) -> bool:
            return any(m.endswith("MLP") for m in _modules(node)) \
                and super().check_constraints(node, ep)

    InMLP.__name__ = InMLP.__qualname__ = f"InMLP{base.__name__}"
    return InMLP


def mlp_partitioner() -> XnnpackPartitioner:
    """An XNNPACK partitioner in per-op mode that takes only the GEMMs inside an MLP module (the
    decoder layers' gate, up and down): each becomes a delegate call of its own, an instruction
    between which edgeadapt's runner can pause a run (module docstring). Given before
    :func:`selective_partitioner`, which partitions the rest."""
    return _PerOp(configs=[_in_mlp(_selective(c)) for c in (LinearConfig, AddmmConfig, MMConfig)],
                  per_op_mode=True)


class _PerOp(XnnpackPartitioner):
    """Keeps from decomposition what :func:`selective_partitioner` keeps: ExecuTorch
    decomposes, partitioner by partitioner, every op the partitioner does not name, so a first
    partitioner that keeps only its own linears would leave the second none to take whole."""

    def ops_to_not_decompose(self, ep: ExportedProgram):
        return selective_partitioner().ops_to_not_decompose(ep)
