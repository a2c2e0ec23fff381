"""The SiRA layer: E LoRA experts and a router, written in fixed-size tensor ops.

Everything after the input's shape is known is static: top-k, one-hot, cumulative sums and
masks over *all* experts, and einsums that compute every expert for every token and zero the
unrouted ones. No data-dependent shapes, no Python branching on tensor values, so
``torch.export`` (ONNX, ExecuTorch) sees one fixed graph per input shape.

Routing of the T = prod(x.shape[:-1]) tokens of a call (every row counts, padding included: a
Linear layer does not see the attention mask):

1. ``p = softmax(x R^T)`` (T, E). In training, expert dropout zeroes entries of p with rate
   ``expert_dropout`` (a dropped expert cannot be chosen for that token).
2. top-k of p per token; chosen weights renormalised over the k: ``w_j = p_j / sum_k p``.
3. capacity ``C = ceil(capacity_factor * k * T / E)``. Priority (as GShard / Switch): all
   tokens' 1st choices in token order, then all 2nd choices in token order, ... An assignment
   is kept iff fewer than C earlier assignments went to its expert; dropped assignments give the
   token nothing from that expert (weights are *not* renormalised again).
4. ``y = x W0^T + b + sum_e gate[t, e] * (alpha / r) B_e A_e x``.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from edgeadapt.adapters.base import AdaptedLinear
from edgeadapt.adapters.lora.layer import init_lora_a


def expert_capacity(capacity_factor: float, top_k: int, tokens: int, num_experts: int) -> int:
    """``C = ceil(capacity_factor * top_k * tokens / num_experts)``."""
    return math.ceil(capacity_factor * top_k * tokens / num_experts)


def route(probs: torch.Tensor, top_k: int, capacity: int) -> torch.Tensor:
    """Combine weights (T, E) from router probabilities (T, E): top-k, renormalised, capacity-
    limited in the documented priority order. Entries are 0 for unrouted or dropped pairs.
    Zero probabilities (expert dropout) are never routed."""
    num_experts = probs.shape[-1]
    top_p, top_i = probs.topk(top_k, dim=-1)                              # (T, k)
    weights = top_p / top_p.sum(-1, keepdim=True).clamp_min(1e-20)
    chosen = F.one_hot(top_i, num_experts).to(probs.dtype)                # (T, k, E)
    chosen = chosen * (top_p > 0).to(probs.dtype).unsqueeze(-1)
    by_priority = chosen.transpose(0, 1).reshape(-1, num_experts)         # (k*T, E)
    position = torch.cumsum(by_priority, dim=0).reshape(top_k, -1, num_experts).transpose(0, 1)
    kept = chosen * (position <= capacity).to(probs.dtype)                # (T, k, E)
    return (kept * weights.unsqueeze(-1)).sum(1)


def switch_aux_loss(probs: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Switch load-balancing loss ``E * sum_e f_e P_e``: f_e the fraction of tokens whose first
    choice is e, P_e the mean router probability of e. probs: (T, E); gates unused for f."""
    num_experts = probs.shape[-1]
    first = F.one_hot(probs.argmax(-1), num_experts).to(probs.dtype)
    return num_experts * (first.mean(0) * probs.mean(0)).sum()


class SiraLinear(AdaptedLinear):
    """``y = x W0^T + b + (alpha / r) sum_e gate_e(x) B_e A_e x`` (routing: module docstring).

    x: (..., in) -> y: (..., out).  sira_router: (E, in) (no bias), sira_A: (E, r, in)
    kaiming-uniform, sira_B: (E, out, r) zeros. In training, the last forward's load-balancing
    loss is kept in ``aux_loss`` (read it through :func:`edgeadapt.adapters.sira.sira_aux_loss`).
    """

    method: ClassVar[str] = "sira"

    def __init__(self, base: nn.Linear, num_experts: int, r: int, alpha: float, top_k: int,
                 capacity_factor: float, expert_dropout: float = 0.0,
                 aux_loss_weight: float = 0.0) -> None:
        super().__init__(base)
        dtype, device = base.weight.dtype, base.weight.device
        E, n_in, n_out = num_experts, self.in_features, self.out_features
        self.r, self.top_k, self.capacity_factor = r, top_k, capacity_factor
        self.scaling = alpha / r
        self.expert_dropout, self.aux_loss_weight = expert_dropout, aux_loss_weight
        self.sira_router = nn.Parameter(torch.empty(E, n_in, dtype=dtype, device=device))
        self.sira_A = nn.Parameter(torch.empty(E, r, n_in, dtype=dtype, device=device))
        self.sira_B = nn.Parameter(torch.zeros(E, n_out, r, dtype=dtype, device=device))
        init_lora_a(self.sira_router)
        for e in range(E):
            init_lora_a(self.sira_A.data[e])
        self.aux_loss: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.sira_router.shape[0]

    def gates(self, x2d: torch.Tensor) -> torch.Tensor:
        """Combine weights (T, E) for the tokens x2d (T, in); records aux_loss in training."""
        probs = torch.softmax(x2d @ self.sira_router.T, dim=-1)
        capacity = expert_capacity(self.capacity_factor, self.top_k, x2d.shape[0],
                                   self.num_experts)
        if self.training:
            self.aux_loss = switch_aux_loss(probs, probs)
            if self.expert_dropout > 0:
                probs = F.dropout(probs, self.expert_dropout, training=True)
        return route(probs, self.top_k, capacity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features)
        gates = self.gates(x2d)                                           # (T, E)
        h = torch.einsum("ti,eri->ter", x2d, self.sira_A) * gates.unsqueeze(-1)
        delta = torch.einsum("ter,eor->to", h, self.sira_B) * self.scaling
        return self.base_forward(x) + delta.reshape(*x.shape[:-1], self.out_features)
