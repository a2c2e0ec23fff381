"""How a live linear is written in the ExecuTorch program: which GEMM operand the live weight is.

XNNPACK packs a GEMM's right ("weight") operand into its blocked layout: once at load when it
is a constant, on *every call* when it is not — and a live weight, a mutable buffer, is not.

- ``"linear"``: ``y = x W^T + b`` (``nn.Linear`` as is). W (out, in) is the right operand:
  packed per call, ``out * in`` floats copied before every GEMM.
- ``"weight-left"``: ``y = (W x^T)^T + b`` (:class:`WeightLeftLinear`). W is the *left*
  operand, read in place; the right operand is x^T (in, tokens), packed per call — cheap at a
  few tokens, the GEMM's N is the token count.
- ``"own-kernel"``: ``y = live_linear(x, W) + b`` (:class:`KernelLinear`): edgeadapt's own
  ExecuTorch kernel ``edgeadapt::live_linear.out`` (``edgeadapt/runtime/kernels/``), outside
  XNNPACK: a GEMV at one token, a register-tiled GEMM over packed x^T panels above, W read in
  place. Needs the kernel library loaded wherever the program runs
  (:mod:`edgeadapt.runtime.backends.executorch.kernel`, built with the system C++ compiler).
  Quantized bundles write :class:`QKernelLinear` instead (``edgeadapt::live_qlinear.out``:
  int8 codes + scales read in place; int4 codes packed two per byte,
  ``edgeadapt::live_q4linear.out``; docs/quantized.md, "ExecuTorch").

Measured (docs/bench.md, ExecuTorch runs 3 and 5): SmolLM2 q/v live / all-constant forward at
1x1, 1x64, 8x64 is 0.98-0.99, 0.99-1.02, 1.00-1.01 own-kernel (three runs); 1.06-1.08, <= 1.00,
<= 1.00 weight-left; 1.11-1.24, 1.02, 1.00 linear. At one token every XNNPACK form pays on
the live linears (N = 1 is padded to XNNPACK's tile width in weight-left); the own kernel's
GEMV does not. The weight buffer keeps its name and (out, in) layout in every form, so the
switch runtime is unchanged.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgeadapt.errors import ConfigError
from edgeadapt.format import nibbles
from edgeadapt.format.quant import Grid
from edgeadapt.models.quantized import ACT_BLOCK, quantize_activations

LIVE_FORMS = ("linear", "weight-left", "own-kernel")
#: the scales buffer beside a quantized live weight's codes (:class:`QKernelLinear`)
SCALES_SUFFIX = "scales"


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


_OP_LIB: object = None


def define_live_linear_op() -> None:
    """Register ``torch.ops.edgeadapt.live_linear(x, w) -> x @ w^T``, ``live_qlinear(x, codes,
    scales)`` and ``live_q4linear(x, packed, scales)`` (the dequantized codes' linear), their
    ``_a8`` forms (the same on ``A(x)``, the activations quantized:
    :func:`edgeadapt.models.quantized.quantize_activations`) and their ``.out`` variants
    with PyTorch (eager reference and shape function), once per process, so
    that torch.export can trace :class:`KernelLinear` / :class:`QKernelLinear` and ExecuTorch
    can emit the out variants its runtime kernels implement."""
    global _OP_LIB
    if _OP_LIB is not None:
        return
    lib = torch.library.Library("edgeadapt", "DEF")

    def define(name: str, args: str, eager) -> None:
        """``name(x, <args>)`` with the eager reference ``eager(x, w, ...)`` (its output rows:
        the first weight operand's first dimension), its ``.out`` variant and its shape."""
        lib.define(f"{name}(Tensor x, {args}) -> Tensor")
        lib.define(f"{name}.out(Tensor x, {args}, *, Tensor(a!) out) -> Tensor(a!)")

        def eager_out(x: torch.Tensor, *ops: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            out.resize_(*x.shape[:-1], ops[0].shape[0]).copy_(eager(x, *ops))
            return out

        lib.impl(name, eager, "CompositeExplicitAutograd")
        lib.impl(f"{name}.out", eager_out, "CompositeExplicitAutograd")
        torch.library.register_fake(f"edgeadapt::{name}", lambda x, w, *rest: x.new_empty(
            (*x.shape[:-1], w.shape[0])), lib=lib)

    def q_eager(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, dequantize_codes(codes, scales))

    def a8_eager(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return q_eager(quantize_activations(x), codes, scales)

    define("live_linear", "Tensor w", lambda x, w: nn.functional.linear(x, w))
    define("live_qlinear", "Tensor codes, Tensor scales", q_eager)
    define("live_q4linear", "Tensor packed, Tensor scales",
           lambda x, packed, scales: q_eager(x, unpack_codes(packed), scales))
    define("live_qlinear_a8", "Tensor codes, Tensor scales", a8_eager)
    define("live_q4linear_a8", "Tensor packed, Tensor scales",
           lambda x, packed, scales: a8_eager(x, unpack_codes(packed), scales))
    _OP_LIB = lib


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``W[r, c] = q[r, c] * s[r, c // G]`` (float32 ``(out, in)``) from int8 codes
    ``(out, in)`` and scales ``(out, in // G)``: :meth:`edgeadapt.format.quant.Grid.dequantize`
    in torch, the same float32 products."""
    group = codes.shape[1] // scales.shape[1]
    return codes.to(torch.float32) * scales.repeat_interleave(group, dim=1)


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """int8 codes ``(out, in)`` of int4 codes packed two per byte, ``(out, in / 32, 16)``
    uint8 (:func:`edgeadapt.format.nibbles.unpack` in torch: low nibbles the columns
    ``32 b + j``, high nibbles ``32 b + 16 + j``, each less 8)."""
    nib = packed.to(torch.int16)
    lo, hi = (nib & 0x0F) - nibbles.OFFSET, (nib >> 4) - nibbles.OFFSET
    return torch.cat([lo, hi], dim=-1).to(torch.int8).reshape(packed.shape[0], -1)


def packs(grid: Grid) -> bool:
    """Whether a live weight's codes on ``grid`` are held packed two per byte
    (:class:`QKernelLinear`): int4 codes whose groups are whole blocks of 32 columns."""
    return grid.bits == 4 and grid.group % nibbles.BLOCK == 0


#: what a quantized live linear does with its input: quantize it (int8, per row in blocks of 32
#: columns) or not (float, weight-only)
ACTIVATIONS = ("int8", "float")


def quantizes_activations(grid: Grid, in_features: int) -> bool:
    """Whether a live weight on ``grid`` with ``in_features`` columns takes int8 activations
    (:class:`QKernelLinear`): its groups and its columns whole blocks of 32 (the kernel's
    integer products); else float activations."""
    return grid.group % ACT_BLOCK == 0 and in_features % ACT_BLOCK == 0


class KernelLinear(nn.Module):
    """``nn.Linear`` computed by ``torch.ops.edgeadapt.live_linear`` (``y = x W^T + b``, the
    GEMM in edgeadapt's own ExecuTorch kernel); the same ``weight`` and ``bias`` tensors."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        define_live_linear_op()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.edgeadapt.live_linear(x, self.weight)
        return y if self.bias is None else y + self.bias


class QKernelLinear(nn.Module):
    """A quantized live linear (``--weights int8|int4``, own-kernel form):
    ``y = live_qlinear(x, q, s) + b``, ``W = q * s`` (:func:`dequantize_codes`) read in place
    by edgeadapt's ExecuTorch kernel ``edgeadapt::live_qlinear.out``.

    ``activations``: ``"int8"`` (:func:`quantizes_activations`): ``y = live_qlinear_a8(x, q, s)
    + b``, the same on ``A(x)``, x quantized per row in blocks of 32 columns as edgeadapt's
    ONNX Runtime kernel and MatMulNBits at accuracy level 4 quantize it
    (:func:`edgeadapt.models.quantized.quantize_activations`; the kernel multiplies int8
    activations by the codes); ``"float"``: weight-only. ``weight``: int8 codes ``(out, in)``
    (torch layout, as the fp32 own-kernel form's weight), ``scales``: float32
    ``(out, in // G)``; the exporter makes both buffers.

    ``packed`` (int4 codes, :func:`packs`): ``weight`` holds them two per byte,
    ``(out, in / 32, 16)`` uint8 (:func:`edgeadapt.format.nibbles.pack` of the codes cut into
    blocks of 32 columns: code ``(r, c)``, flat position ``p = r * in + c``, in byte
    ``(p >> 5) * 16 + (p & 15)``, high nibble iff ``p & 16``), read by
    ``edgeadapt::live_q4linear.out``: half a byte per weight."""

    def __init__(self, linear: nn.Linear, codes: torch.Tensor, scales: torch.Tensor,
                 packed: bool = False, activations: str = "float") -> None:
        super().__init__()
        define_live_linear_op()
        if activations not in ACTIVATIONS:
            raise ConfigError(f"activations {activations!r}: choose one of "
                              f"{', '.join(ACTIVATIONS)}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = packed
        self.activations = activations
        self.register_buffer("weight", self.held(codes))
        self.register_buffer("scales", scales.to(torch.float32).contiguous())
        self.bias = linear.bias

    def held(self, codes: torch.Tensor | np.ndarray) -> torch.Tensor:
        """int8 codes ``(out, in)`` as ``weight`` holds them (packed where ``packed``)."""
        codes = torch.as_tensor(codes).to(torch.int8).contiguous()
        if not self.packed:
            return codes
        blocks = codes.numpy().reshape(self.out_features, -1, nibbles.BLOCK)
        return torch.from_numpy(nibbles.pack(blocks))

    def codes(self) -> torch.Tensor:
        """The int8 codes ``(out, in)`` the buffer holds (unpacked where ``packed``)."""
        return unpack_codes(self.weight) if self.packed else self.weight

    @torch.no_grad()
    def set_codes(self, codes: torch.Tensor | np.ndarray) -> None:
        """Write int8 codes ``(out, in)`` into ``weight`` in place (packed where ``packed``)."""
        self.weight.copy_(self.held(codes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = ("live_q4linear" if self.packed else "live_qlinear") + (
            "_a8" if self.activations == "int8" else "")
        y = getattr(torch.ops.edgeadapt, name)(x, self.weight, self.scales)
        return y if self.bias is None else y + self.bias


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
        replace_module(model, name, (WeightLeftLinear if form == "weight-left"
                                     else KernelLinear)(linear))
