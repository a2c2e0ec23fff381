"""How a live linear is written in the ExecuTorch program: which GEMM operand the live weight is.

XNNPACK packs a GEMM's right ("weight") operand into its blocked layout: once at load when it
is a constant, on *every call* when it is not — and a live weight, a mutable buffer, is not.

- ``"linear"``: ``y = x W^T + b`` (``nn.Linear`` as is). W (out, in) is the right operand:
  packed per call, ``out * in`` floats copied before every GEMM.
- ``"weight-left"``: ``y = (W x^T)^T + b`` (:class:`WeightLeftLinear`). W is the *left*
  operand, read in place; the right operand is x^T (in, tokens), packed per call — cheap at a
  few tokens, the GEMM's N is the token count.

Measured (docs/bench.md, ExecuTorch run 3): SmolLM2 q/v live / all-constant forward at 1x1,
1x64, 8x64 is 1.06, <= 1.00, <= 1.00 weight-left against 1.11-1.24, 1.02, 1.00 linear; on
MiniLM q/v the forms are within 1.5% of each other except 1x64 (1.005 vs 1.030). At one token
both forms pay on the live linears (N = 1 is padded to XNNPACK's tile width in weight-left).
The weight buffer keeps its name and (out, in) layout either way, so the runtime is unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from edgeadapt.errors import ConfigError

LIVE_FORMS = ("linear", "weight-left")


class WeightLeftLinear(nn.Module):
    """``nn.Linear`` computed as ``y = (W x^T)^T + b`` (W the GEMM's left operand); the same
    ``weight`` (out, in) and ``bias`` (out,) tensors as the linear it replaces."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        y = torch.mm(self.weight, flat.t()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def apply_live_form(model: nn.Module, linear_names: list[str], form: str) -> None:
    """Rewrite the named ``nn.Linear`` modules of ``model`` in place into ``form``."""
    from edgeadapt.adapters.base import replace_module

    if form not in LIVE_FORMS:
        raise ConfigError(f"live form {form!r}: choose one of {', '.join(LIVE_FORMS)}")
    if form == "linear":
        return
    for name in linear_names:
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise ConfigError(f"{name!r} is not an nn.Linear")
        replace_module(model, name, WeightLeftLinear(linear))
