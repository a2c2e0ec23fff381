"""The PyTorch reference of a quantized bundle (``--weights int8|int4``): each quantized
nn.Linear computes with its weight on the grid of :mod:`edgeadapt.format.quant`, and the
weights the backend runs on its stock kernels also see that kernel's activation quantization.

    quantize_reference_(lm, "int4", live=["...q_proj.weight", ...])   # in place, like torchao's
                                                                      # quantize_(model, config)

Which weights: :func:`edgeadapt.models.targets.quantized_weight_names` (the export policy).
For a weight ``W (out, in)`` with codes ``q`` and scales ``s`` (``Grid.quantize(W)``, numpy,
the one home of the code arithmetic), ``Wq = q * s`` (float32, ``Grid.dequantize``), and

- *live* weights (the bundle's ``--targets``: codes + scales read by edgeadapt's own kernel):
  ``y = x @ Wq.T + b`` (weight-only), as the exported graph's own dequantization computes them
  (edgeadapt's ONNX Runtime kernel computes them with ``A`` below, as the rest's MatMulNBits:
  ``accuracy_level`` 4, kernels/blocked_matmul.cpp);
- the other quantized weights (ONNX Runtime's stock ``MatMulNBits``, 8 or 4 bits, symmetric
  blocks of 32, ``accuracy_level`` 4), ``y = A(x) @ Wq.T + b`` with the kernel's activation
  quantizer ``A`` (:func:`quantize_activations`): per row, in blocks of 32 along ``in``,
  symmetric int8::

      m = max |x_blk|, a = m / 127, A(x)_blk = rint(x_blk * (127 / m)) a     (m = 0: 0)

  It factors out of the integer products the kernel computes (the sum over blocks of
  ``a_blk s_blk (aq_blk . q_blk)``), so the reference differs from the backend by float32
  rounding only. Measured against ONNX Runtime 1.31 on single MatMuls quantized by its own
  tool (tests/test_quant_reference.py: M in 1..129 rows, odd output sizes; experiments/
  quant_reference_probe.py): largest ``|y_ort - y_ref| / max |y_ort|`` 7.8e-7 for both
  precisions; weight-only, without ``A``, the same outputs differ by 4e-3 to 6e-3, so the
  activation scheme is what the tests pin down, to the rounding: MLAS multiplies by ``127 / m``
  (not ``1 / a``, nor divides by ``a``) and rounds ties to even; blocks built of values where
  those differ pin it (tests/test_quant_reference.py). On MiniLM's real activations (8 x 64
  tokens, the inputs of 8 of its 36 Linears, each quantized alone) the same measure is at most
  9.3e-7. Through the whole model the differences compound, because a float difference that
  moves an activation across a rounding boundary changes it by a whole step: ONNX Runtime's
  model of all 36 Linears quantized by its tool against this reference (random tokens, logits;
  1 x 1, 1 x 64, 8 x 64) int8 1.5e-2, 5.7e-3, 1.6e-2 and int4 2.0e-2, 2.1e-2, 9.2e-3 (each
  against fp32: 2.5e-2 to 0.41). A whole-model parity check needs a tolerance of that order,
  or layer by layer inputs.

An affine grid (``int4-affine``, :func:`edgeadapt.format.quant.affine_split`) quantizes
``W' = W - O`` and adds the offset term in float: ``y = A(x) @ Wq'.T + (x @ P) @ o.T + b``
(``x @ P`` the sums of ``x`` over each block of 32 columns, ``o`` the ``(out, in // G)``
offsets), as the exported graph computes it (the offsets never see the activation quantizer).

Training through the reference (quantization-aware SHiRA, ``edgeadapt train --quant``): ``A``
passes gradients straight through (``dA/dx = 1``); the codes and scales are frozen buffers.
The base's fp32 Parameters are left as they are (names, fingerprints and ``state_dict``
unchanged): the codes, scales and dequantized weight are non-persistent buffers of a
:class:`WeightQuant` child module.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from edgeadapt.errors import ConfigError
from edgeadapt.format.quant import Grid, affine_split, grid
from edgeadapt.models.registry import LoadedModel
from edgeadapt.models.targets import quantized_weight_grids, quantized_weight_names

#: MatMulNBits at accuracy level 4 quantizes activations in the weight's blocks of 32
ACT_BLOCK = 32


class _StraightThrough(torch.autograd.Function):
    """``forward(x, y) = y`` (a value computed from ``x`` without autograd); ``d/dx`` = 1."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        return g, None


def straight_through(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y`` in the forward, exactly, with the gradient of ``x`` (straight-through estimator)."""
    return _StraightThrough.apply(x, y.detach())


@torch.no_grad()
def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """``A(x)`` of the module docstring (float32, the shape of ``x (..., in)``; ``in`` a multiple
    of 32); no gradient (see :func:`fake_quantize_activations`)."""
    blocks = x.float().reshape(*x.shape[:-1], -1, ACT_BLOCK)
    m = blocks.abs().amax(dim=-1, keepdim=True)
    # a tensor over a tensor: ``127.0 / m`` would be ``127 * (1 / m)``, rounded otherwise
    inv = torch.full_like(m, 127.0) / torch.where(m > 0, m, torch.ones_like(m))
    inv = torch.where(m > 0, inv, torch.zeros_like(m))
    return (torch.round(blocks * inv) * (m / 127.0)).reshape(x.shape)


def fake_quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """``A(x)`` forward, identity backward."""
    return straight_through(x, quantize_activations(x))


def grid_round(g: Grid, x: torch.Tensor) -> torch.Tensor:
    """``Grid.round`` in torch (float32 codes): ``floor(x + 2^(b-1) + 0.5) - 2^(b-1)``, clipped
    to the code range (ONNX Runtime's quantizer; ties go up)."""
    off = float(-g.qmin)
    return torch.clamp(torch.floor(x + off + 0.5), 0, g.qmax - g.qmin) - off


class WeightQuant(nn.Module):
    """One weight on a grid: the reference of a quantized Linear.

    Buffers (non-persistent): ``codes`` int8 ``(out, in)``, ``base_codes`` (the codes of the
    base weight, for :meth:`reset_`), ``scales`` float32 ``(out, in // G)`` (frozen: the base's),
    ``dequantized`` float32 ``(out, in)`` = ``codes * scale`` (kept in step with ``codes``);
    ``offsets`` float32 ``(out, in // G)`` (``o``, an affine grid only, else None).
    ``activations``: whether inputs go through ``A`` (a weight the backend runs on its stock
    kernel) or not (a live weight).
    """

    def __init__(self, weight: torch.Tensor, precision: str, activations: bool) -> None:
        super().__init__()
        self.grid: Grid = grid(precision)
        self.activations = bool(activations)
        w = weight.detach().float().cpu().numpy()
        device = weight.device
        offsets = None
        if self.grid.affine:
            w, o = affine_split(w, self.grid)
            offsets = torch.from_numpy(o).to(device)
        self.register_buffer("offsets", offsets, persistent=False)
        codes, scales = self.grid.quantize(w)
        self.register_buffer("codes", torch.from_numpy(codes).to(device), persistent=False)
        self.register_buffer("base_codes", self.codes.clone(), persistent=False)
        self.register_buffer("scales", torch.from_numpy(scales).to(device), persistent=False)
        self.register_buffer("dequantized", torch.from_numpy(self.grid.dequantize(codes, scales)
                                                             ).to(device), persistent=False)
        self.register_buffer("entry_scales", torch.from_numpy(
            self.grid.scale_of(scales, codes.shape)).to(device), persistent=False)

    @property
    def precision(self) -> str:
        return self.grid.name

    def extra_repr(self) -> str:
        return f"{self.precision}, activations={'quantized' if self.activations else 'float'}"

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """``A(x)`` (straight-through) for a stock-kernel weight, ``x`` for a live one."""
        return fake_quantize_activations(x) if self.activations else x

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``inputs(x) @ dequantized.T + bias`` (``+ x @ O.T``, affine): (..., in) -> (..., out)."""
        return self.add_offsets(F.linear(self.inputs(x), self.dequantized, bias), x)

    def add_offsets(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``y + (x @ P) @ o.T`` on an affine grid (``x`` unquantized: its block sums), else
        ``y``."""
        if self.offsets is None:
            return y
        sums = x.reshape(*x.shape[:-1], self.offsets.shape[1], -1).sum(dim=-1)
        return y + F.linear(sums, self.offsets)

    def on_grid(self, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """The weight entries at flat ``indices`` after adding ``values`` on the grid, with the
        base's scales: ``s * round((q s + v) (1 / s))`` (``Grid.requantize``'s arithmetic and
        rounding, :func:`grid_round`, bit for bit, in float32 torch so that it trains); the
        gradient of ``values`` passes straight through. (K,) -> (K,)."""
        q = self.base_codes.view(-1)[indices].float()
        s = self.entry_scales.view(-1)[indices]
        with torch.no_grad():
            inverse = torch.ones_like(s) / s  # as Grid.requantize: times 1 / s, not over s
            exact = grid_round(self.grid, (q * s + values.detach().float()) * inverse) * s
        return straight_through(values, exact.to(values.dtype))

    def grid_delta(self, indices: np.ndarray, values: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
        """``values`` rounded onto the grid at flat ``indices`` of the base codes:
        :func:`edgeadapt.format.quant_adapter.grid_delta` on this weight."""
        from edgeadapt.format.quant_adapter import grid_delta

        return grid_delta(self.grid, self.base_codes.cpu().numpy(), self.scales.cpu().numpy(),
                          indices, values)

    @torch.no_grad()
    def requantize_(self, indices: np.ndarray, delta: np.ndarray) -> int:
        """Fuse a sparse ``delta`` at flat ``indices`` into the *current* codes
        (``Grid.requantize``, the base's scales), as a switch on codes does; returns how many
        entries saturated."""
        idx = np.asarray(indices, np.int64)
        flat = self.codes.view(-1)
        q = flat[torch.from_numpy(idx)].cpu().numpy()
        s = self.grid.scale_at(self.scales.cpu().numpy(), tuple(self.codes.shape), idx)
        new, saturated = self.grid.requantize(q, s, delta)
        self._write(idx, new)
        return int(saturated.sum())

    @torch.no_grad()
    def set_codes_(self, codes: torch.Tensor) -> None:
        """Replace every code (e.g. a saved copy) and refresh ``dequantized``."""
        self.codes.copy_(codes)
        self.dequantized.copy_(self.codes.float() * self.entry_scales)

    def reset_(self) -> None:
        """Back to the base's codes."""
        self.set_codes_(self.base_codes)

    def _write(self, idx: np.ndarray, codes: np.ndarray) -> None:
        t = torch.from_numpy(idx).to(self.codes.device)
        new = torch.from_numpy(np.asarray(codes, np.int8)).to(self.codes.device)
        self.codes.view(-1)[t] = new
        self.dequantized.view(-1)[t] = new.float() * self.entry_scales.view(-1)[t]


class QuantizedLinear(nn.Linear):
    """An nn.Linear computing through its :class:`WeightQuant` (``quant``); it holds the
    original fp32 ``weight`` / ``bias`` Parameters (not copies), so names are unchanged and an
    adapter attached later (``edgeadapt.adapters.attach``) takes them, and ``quant``, over."""

    def __init__(self, base: nn.Linear, quant: WeightQuant) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.quant = quant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant.linear(x, self.bias)


def _module_name(name: str) -> str:
    return name.removesuffix(".weight")


def quantize_reference_(lm: LoadedModel, precision: str, live: list[str],
                        quantized: list[str] | None = None, activations: bool = True
                        ) -> list[str]:
    """Make ``lm.model`` the reference of a ``precision`` bundle, in place.

    live: the live weight names (the bundle's ``--targets``, ``<module>.weight``; module names
    are accepted too): weight-only, always quantized. quantized: the weights on the grid
    (default: :func:`quantized_weight_names`, the export policy, plus ``live``; the policy sees
    nn.Linear layers only, so on a model whose body layers carry adapters other than the live
    ones, pass the policy's names taken before ``attach``). ``live`` must be among them.
    activations: False leaves every input float (weight-only everywhere).

    Each weight goes on its grid of :func:`quantized_weight_grids` (``precision``'s; a causal
    LM's head on int8 for int4-affine, the live weights on int8 for int4-affine-live8). An
    nn.Linear becomes a :class:`QuantizedLinear`; an adapted layer
    (``edgeadapt.adapters.AdaptedLinear``) gets the :class:`WeightQuant` as its ``quant`` and
    runs its base through it (SHiRA then puts its values on the grid). A layer that already has
    one is re-quantized from its fp32 weight. Returns the quantized weight names.
    """
    grid(precision)  # ConfigError for an unknown precision, before anything changes
    live_set = {_module_name(n) + ".weight" for n in live}
    if quantized is None:
        chosen = set(quantized_weight_names(lm.model, lm.kind)) | live_set
        names = [n for n, _ in lm.model.named_parameters(remove_duplicate=False) if n in chosen]
    else:
        names = [_module_name(n) + ".weight" for n in quantized]
    stray = sorted(live_set - set(names))
    if stray:
        raise ConfigError(f"live weight(s) {stray[:3]} are not among the quantized weights")
    modules = {}
    for name in names:
        module = lm.model.get_submodule(_module_name(name))
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not (
                isinstance(module, nn.Linear) or hasattr(module, "quant")):
            raise ConfigError(f"{name} is not the weight of a Linear layer")
        modules[name] = module
    grids = quantized_weight_grids(lm.model, lm.kind, precision, names, live_set)
    for name, module in modules.items():
        quant = WeightQuant(module.weight, grids[name].name,
                            activations and name not in live_set)
        if isinstance(module, nn.Linear) and not isinstance(module, QuantizedLinear):
            _replace(lm.model, _module_name(name), QuantizedLinear(module, quant))
        else:
            module.quant = quant
    return names


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def weight_quants(model: nn.Module) -> dict[str, WeightQuant]:
    """Weight name -> its :class:`WeightQuant`, for every quantized layer of ``model``."""
    return {f"{name}.weight": m.quant for name, m in model.named_modules()
            if isinstance(getattr(m, "quant", None), WeightQuant)}

