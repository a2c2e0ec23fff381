"""The SHiRA layer: a frozen dense weight plus K trainable sparse entries, trained cheaply.

Training cost is the point. Only the K values are a Parameter (shape (K,), so no dense optimizer
state), and nothing of size (out, in) is allocated per step: no clone of the weight, no dense
delta, no dense weight gradient.

How: the forward (and the input-gradient product of the backward) runs *fused*, as SHiRA is
deployed: the K masked entries of the base weight are saved (a K-gather), overwritten in place
with ``W0[idx] + values``, one dense GEMM runs, and the saved entries are written back — the
base weight is bit-for-bit what it was, and the extra work is O(K), not O(out * in). The value
gradient is the *sampled* product ``(g^T x)[rows, cols]`` (``torch.sparse.sampled_addmm``: K dot
products of length N).

Alternatives measured on one thread of the shared 2-core CPU, 576x576 weight, K = 8 * (576 + 576)
(the budget of a LoRA r=8), extra time per forward over the plain GEMM: a torch.sparse CSR product
x S^T +1.5 ms at N=512 tokens (the transposes around the kernel dominate; it made SmolLM2's whole
training step 1.16x LoRA's), gather + index_add +44 ms at N=512, a dense delta built per call
+3.7 ms at N=128; fused in place: gather + two K-scatters, ~0.3 ms. See docs/train_cost.md.

Caveat of the in-place fusion: the weight holds W0 + S *during* this layer's forward/backward
kernels, so the same weight must not be read concurrently by another thread (nn.DataParallel);
DistributedDataParallel (one process per replica) is fine.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from edgeadapt.adapters.base import AdaptedLinear


@contextmanager
def fused_in_place(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                   replace: bool = False) -> Iterator[None]:
    """Temporarily ``W.flat[indices] += values`` (``= values`` if ``replace``) in place;
    restores the exact old entries.

    Works on ``weight.data`` so no autograd version counter is bumped (the content seen by any
    other user of the weight after the block is unchanged, bit for bit).
    """
    flat = weight.data.view(-1)
    with torch.no_grad():
        saved = flat.index_select(0, indices)   # index_select / scatter_: the fastest CPU pair
        new = values.detach().to(flat.dtype)
        flat.scatter_(0, indices, new if replace else saved + new)
        try:
            yield
        finally:
            flat.scatter_(0, indices, saved)


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
         shape: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():  # "CSR support is in beta": we rely only on sampling
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


class _ShiraLinearFunction(torch.autograd.Function):
    """``y = x (W0 + S)^T + b`` with S the (out, in) sparse matrix of ``values`` at the mask
    (``replace``: the masked entries of W0 replaced by ``values``; the gradients are the same).

    Gradients: ``dx = g (W0 + S)``; ``dvalues[k] = sum_n g[n, row_k] x[n, col_k]``;
    ``dW0 = g^T x`` and ``db = sum_n g`` only if the base is (unusually) trainable.
    x: (N, in), g: (N, out).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, values, indices, crow, col, replace):
        with fused_in_place(weight, indices, values, replace):
            y = F.linear(x, weight, bias)
        ctx.save_for_backward(x, values, indices, crow, col)
        ctx.weight = weight          # not saved_tensors: its data is touched in place (restored)
        ctx.has_bias = bias is not None
        ctx.replace = replace
        return y

    @staticmethod
    def backward(ctx, g):
        x, values, indices, crow, col = ctx.saved_tensors
        weight = ctx.weight
        need_x, need_w, need_b, need_v = ctx.needs_input_grad[:4]
        gx = gw = gb = gv = None
        if need_x:
            with fused_in_place(weight, indices, values, ctx.replace):
                gx = g @ weight
        if need_v:
            pattern = _csr(crow, col, values.detach(), (weight.shape[0], weight.shape[1]))
            gv = torch.sparse.sampled_addmm(pattern, g.T.contiguous(), x, beta=0.0).values()
        if need_w:
            gw = g.T @ x
        if need_b and ctx.has_bias:
            gb = g.sum(0)
        return gx, gw, gb, gv, None, None, None, None


class ShiraLinear(AdaptedLinear):
    """``y = x (W0 + S)^T + b`` with ``S.flat[indices] = shira_values``, zero elsewhere.

    x: (..., in) -> y: (..., out).  W0: (out, in), frozen; identical before and after every call.
    shira_indices: (K,) int64 strictly increasing flat row-major positions (persistent buffer).
    shira_values: (K,) trainable deltas, initialised to zero (the model starts at the base).

    On a quantized base (``quant`` set, :class:`edgeadapt.models.quantized.WeightQuant`: codes
    ``q``, frozen scales ``s``) the weight is the dequantized ``q s`` and the masked entries are
    the values put on its grid, ``s clip(rint((q s + v) / s), qmin, qmax)`` (what a switch on
    codes writes), with a straight-through gradient: training there is quantization-aware
    SHiRA, and an fp32-trained ``v`` evaluated there is its post-training rounding.
    """

    method: ClassVar[str] = "shira"

    def __init__(self, base: nn.Linear, indices: torch.Tensor) -> None:
        super().__init__(base)
        device = base.weight.device
        indices = indices.to(device=device, dtype=torch.int64)
        self.register_buffer("shira_indices", indices)
        self.shira_values = nn.Parameter(torch.zeros(indices.numel(), dtype=base.weight.dtype,
                                                     device=device))
        rows = indices // self.in_features
        crow = torch.zeros(self.out_features + 1, dtype=torch.int64, device=device)
        crow[1:] = torch.bincount(rows, minlength=self.out_features).cumsum(0)
        self.register_buffer("_crow", crow, persistent=False)
        self.register_buffer("_col", indices % self.in_features, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        weight, values, replace, x_in = self.weight, self.shira_values, False, x
        if self.quant is not None:
            weight, replace = self.quant.dequantized, True
            values = self.quant.on_grid(self.shira_indices, self.shira_values)
            x = self.quant.inputs(x)
        y = _ShiraLinearFunction.apply(x.reshape(-1, self.in_features), weight, self.bias,
                                       values, self.shira_indices, self._crow, self._col,
                                       replace)
        y = y.reshape(*lead, self.out_features)
        return y if self.quant is None else self.quant.add_offsets(y, x_in)

    def dense_delta(self) -> torch.Tensor:
        """S as a dense (out, in) tensor (for tests and inspection, not for training)."""
        delta = torch.zeros(self.out_features * self.in_features, dtype=self.shira_values.dtype,
                            device=self.shira_values.device)
        delta[self.shira_indices] = self.shira_values.detach()
        return delta.reshape(self.out_features, self.in_features)
