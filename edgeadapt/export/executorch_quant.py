"""Quantized ExecuTorch programs (``--weights int8|int4``): the rest of the weights on
XNNPACK's own quantized linears through torchao, the live weights as int8 codes + scales that
edgeadapt's kernel reads in place.

Which weights: :func:`edgeadapt.models.targets.quantized_weight_names` (every Linear in the
transformer blocks, and a causal LM's head), as on ONNX Runtime (:mod:`.onnx_quant`).

- The *rest* (quantized, not live) is quantized by torchao exactly as ExecuTorch's own LLM
  export quantizes a model (``quantize_(model, Int8DynamicActivationIntxWeightConfig(...))``,
  ``examples/models/llama/source_transformation/quantize.py``), and lowered to XNNPACK's
  dynamically quantized fully-connected operators (activations int8, asymmetric, per token):

  - int4: ``weight_dtype=torch.int4, PerGroup(32)`` (XNNPACK ``qb4w``: blocks of 32, the
    grid's group); scales in bfloat16 (``weight_scale_dtype``), because XNNPACK stores
    blockwise scales as bfloat16 anyway (``node_visitor.py``), so the PyTorch model the export
    checks against holds the very scales the program runs;
  - int8: ``weight_dtype=torch.int8, PerAxis(0)``, one scale per output channel (XNNPACK
    ``qc8w``): XNNPACK 1.5.1 groups 4-bit weights only ("Only 4b group quantization is
    supported" for int8 in groups of 32).

  torchao's symmetric codes are *not* :meth:`edgeadapt.format.quant.Grid.quantize`'s: its
  scale is ``s = max|W_group| / ((qmax - qmin) / 2)`` (``/ 7.5`` | ``/ 127.5``, positive; the
  largest magnitude rounds to ``qmax`` or clamps), rounding half to even, where the grid's is
  ``s = v / qmin`` (sign kept, the largest magnitude exactly on ``qmin``) rounding half up.
  XNNPACK takes no negative scales, so the grid's codes cannot be handed to it as they are.
  Nothing edits these weights, so only the live weights need edgeadapt's grid.
- The *live* weights (``--targets``, quantized ones) become :class:`QKernelLinear`: int8 codes
  ``(out, in)`` and float32 scales ``(out, in // 32)`` on edgeadapt's grid
  (:mod:`edgeadapt.format.quant`, the same codes as the ONNX Runtime bundle's), both mutable
  buffers of the program read in place by ``edgeadapt::live_qlinear_a8.out``
  (``runtime/kernels/live_linear.cpp``): int8 activations (per row in blocks of 32 columns, as
  edgeadapt's ONNX Runtime kernel and MatMulNBits at accuracy level 4 quantize them) times the
  codes in integers, as XNNPACK's own quantized linears multiply theirs (columns or groups not
  whole blocks of 32: ``live_qlinear.out``, float activations); int4 codes packed two per
  byte, ``(out, in / 32, 16)`` uint8 (:mod:`edgeadapt.format.nibbles`), read by
  ``edgeadapt::live_q4linear_a8.out`` (half a byte per weight, as XNNPACK's own 4-bit
  linears). The weight's ``quant`` entry records ``"activations"`` (``int8`` | ``float``).
  Live weights that are not quantized (a classifier's head) stay fp32 (:class:`KernelLinear`).

The ``--generate`` decoder (:mod:`.executorch_decoder`) is lowered from the same quantized
copy of the model, so it reads the same codes buffers and runs the rest on the same XNNPACK
linears; it is checked against that copy's PyTorch forward within :data:`QUANT_MAX_REL_ERR`.

Not supported yet (ConfigError): branch variants (unfused LoRA / SiRA), live forms other than
``own-kernel``, and the constant program of repack mode (not written: a quantized bundle runs
live only).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib

import numpy as np
import torch
from torch import nn

from edgeadapt.errors import ConfigError, ExportError
from edgeadapt.export.executorch_live_form import (
    SCALES_SUFFIX,
    QKernelLinear,
    packs,
    quantizes_activations,
)
from edgeadapt.format.fingerprint import weight_sha256
from edgeadapt.format.quant import Grid, grid
from edgeadapt.models import LoadedModel
from edgeadapt.models.targets import quantized_weight_names

#: a quantized program against the PyTorch model it was lowered from (torchao's quantized
#: linears computed eagerly, the live codes dequantized): XNNPACK rounds an activation to the
#: neighbouring int8 code now and then where torchao does not; mostly ~3e-7, at most 2.2e-3
#: measured on a one-block Llama (tests/test_executorch_quantized.py)
QUANT_MAX_REL_ERR = 5e-3

#: :func:`reference_spread`: each activation quantizer's input times ``1 + eps N(0, 1)``, a
#: float32 rounding's size (half an ulp is 6e-8 of the value): how far the reference moves
#: when another runtime's float arithmetic (XNNPACK's, the kernel's) differs from PyTorch's
JITTER_EPS = 1e-7
#: :func:`reference_spread`'s draws
JITTER_DRAWS = 3
#: a quantized program's relative error may reach this many times the worst of its
#: reference's own spread (:func:`quant_gate`)
SPREAD_FACTOR = 2.0
#: ... and its pooled top-1 agreement may fall this far below the spread's least
TOP1_MARGIN = 0.1


def check_options(precision: str, branch: tuple | None, live_form: str | None) -> Grid:
    """The grid of ``precision``; ConfigError for what a quantized program does not support."""
    g = grid(precision)
    if branch is not None:
        raise ConfigError(f"--weights {precision}: ExecuTorch graph variants (unfused LoRA / "
                          "SiRA) of quantized bundles are not supported yet")
    if live_form not in (None, "own-kernel"):
        raise ConfigError(f"--weights {precision}: quantized live weights are read by "
                          f"edgeadapt's own kernel only (live form own-kernel, not {live_form})")
    return g


def rest_config(g: Grid):
    """torchao's config for the rest on ``g``'s bits (module docstring)."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_primitives import MappingType

    if g.bits == 4:
        return Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int4, weight_granularity=PerGroup(g.group),
            weight_mapping_type=MappingType.SYMMETRIC, weight_scale_dtype=torch.bfloat16)
    return Int8DynamicActivationIntxWeightConfig(
        weight_dtype=torch.int8, weight_granularity=PerAxis(0),
        weight_mapping_type=MappingType.SYMMETRIC)


def scales_buffer(weight: str) -> str:
    """The scales buffer's torch name beside quantized live weight ``weight``
    (``...q_proj.weight`` -> ``...q_proj.scales``)."""
    return weight.removesuffix("weight") + SCALES_SUFFIX


def quantized_live_model(lm: LoadedModel, live_weights: list[str], precision: str
                         ) -> tuple[LoadedModel, dict[str, dict]]:
    """A copy of ``lm`` for the quantized live program: the quantized live weights as
    :class:`QKernelLinear` (codes + scales buffers), the other live weights fp32 buffers read
    by :class:`KernelLinear`, the rest quantized by torchao (module docstring). Returns it and,
    per quantized live weight, its ``quant`` entry ``{"grid", "scales": scales buffer (torch
    name), "scales_shape", "codes_sha256", "packed"}`` (``packed``: int4 codes two per byte,
    :func:`~edgeadapt.export.executorch_live_form.packs`; ``codes_sha256`` of the codes
    ``(out, in)`` unpacked, as on ONNX Runtime)."""
    from torchao.quantization import quantize_

    from edgeadapt.adapters.base import replace_module
    from edgeadapt.export.executorch import build_live_model

    g = grid(precision)
    packed = packs(g)
    names = quantized_weight_names(lm.model, lm.kind)
    qlive = [w for w in live_weights if w in names]
    rest = {w.removesuffix(".weight") for w in names if w not in qlive}
    live_lm = build_live_model(lm, [w for w in live_weights if w not in qlive], None,
                               "own-kernel")
    model = live_lm.model
    quant = {}
    for w in qlive:
        mname = w.removesuffix(".weight")
        linear = model.get_submodule(mname)
        codes, scales = g.quantize(linear.weight.detach().float().cpu().numpy())
        activations = "int8" if quantizes_activations(g, linear.in_features) else "float"
        replace_module(model, mname, QKernelLinear(linear, torch.from_numpy(codes),
                                                   torch.from_numpy(scales), packed,
                                                   activations))
        quant[w] = {"grid": g.name, "scales": scales_buffer(w),
                    "scales_shape": list(scales.shape), "codes_sha256": weight_sha256(codes),
                    "packed": packed, "activations": activations}
    missing = rest - {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if missing:
        raise ConfigError(f"--weights {precision}: {sorted(missing)} are not nn.Linear modules")
    with torch.no_grad():
        quantize_(model, rest_config(g), filter_fn=lambda m, fqn: fqn in rest
                  and isinstance(m, nn.Linear))
    return dataclasses.replace(live_lm, model=model), quant


def reference(lm: LoadedModel, result: dict) -> tuple[LoadedModel, float]:
    """What an exported program is checked against: ``lm`` itself with tolerance
    :data:`edgeadapt.export.executorch_verify.MAX_REL_ERR` (fp32), or for a quantized program
    (``result``: :func:`edgeadapt.export.executorch.export_pte`'s answer) the PyTorch model it
    was lowered from (:func:`quantized_live_model`) with :data:`QUANT_MAX_REL_ERR`."""
    return program_reference(lm, list(result["weights"]),
                             result["section"].get("precision", "fp32"))


def program_reference(lm: LoadedModel, live_weights: list[str], precision: str
                      ) -> tuple[LoadedModel, float]:
    """The PyTorch model a ``precision`` program with ``live_weights`` is held to, and the
    tolerance (:func:`reference`): ``lm`` and ``MAX_REL_ERR`` for fp32, else the quantized
    copy it was lowered from (its live codes buffers named as the weights) and
    :data:`QUANT_MAX_REL_ERR`."""
    from edgeadapt.export.executorch_verify import MAX_REL_ERR

    if precision == "fp32":
        return lm, MAX_REL_ERR
    return quantized_live_model(lm, live_weights, precision)[0], QUANT_MAX_REL_ERR


def stock_program(lm: LoadedModel, precision: str, max_batch: int, max_seq: int) -> bytes:
    """What a user of ExecuTorch runs for ``precision``: ``lm`` with *every* quantized weight
    (:func:`~edgeadapt.models.targets.quantized_weight_names`, the live ones included)
    quantized by torchao as the rest is (:func:`rest_config`), every weight constant, lowered
    whole to XNNPACK (dynamic ``batch <= max_batch``, ``seq <= max_seq``); the forward of a
    quantized bundle is timed against it. ExportError if a GEMM stays outside XNNPACK."""
    from edgeadapt.export.executorch import lower_const

    model, _ = quantized_live_model(lm, [], precision)
    with torch.no_grad():
        blob, outside = lower_const(model, max_batch, max_seq)
    if outside:
        raise ExportError(f"ExecuTorch's stock {precision} program of {lm.name}: {outside} "
                          "GEMMs left outside XNNPACK")
    return blob


def quant_entries(result: dict) -> dict[str, dict]:
    """The ``quant`` entries of an export's quantized live weights (weight -> entry), as
    :class:`~edgeadapt.runtime.backends.executorch.store.ExecutorchStore` takes them."""
    return {w: info["quant"] for w, info in result["weights"].items() if "quant" in info}


def dequantized_rest(lm: LoadedModel, live_lm: LoadedModel, live_weights: list[str]
                     ) -> dict[str, np.ndarray]:
    """The rest's weights as torchao holds them in ``live_lm`` (dequantized, float32
    ``(out, in)``), by torch weight name: what XNNPACK multiplies with."""
    out = {}
    for w in quantized_weight_names(lm.model, lm.kind):
        if w in live_weights:
            continue
        weight = live_lm.model.get_submodule(w.removesuffix(".weight")).weight
        out[w] = weight.dequantize().float().numpy()
    return out


#: torchao's per-token int8 activation quantize-dequantize, which its ``IntxUnpackedToInt8Tensor``
#: linear calls by this module-global name on every forward (torchao 0.18)
_TORCHAO_INTX = "torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor"
_TORCHAO_ACT_QUANT = "_apply_int8_act_asym_per_token_quant_dequant"


@contextlib.contextmanager
def jittered_activations(eps: float, seed: int):
    """Within: every per-token int8 activation quantization of torchao's quantized linears (the
    rest of :func:`quantized_live_model`) quantizes ``x * (1 + eps N(0, 1))`` instead of ``x``.
    Yields a dict whose ``"calls"`` counts the quantizations jittered. ConfigError where
    torchao no longer has the function this patches."""
    mod = importlib.import_module(_TORCHAO_INTX)
    original = getattr(mod, _TORCHAO_ACT_QUANT, None)
    if original is None:
        raise ConfigError(f"torchao {_TORCHAO_INTX}.{_TORCHAO_ACT_QUANT} is gone: the jittered "
                          "reference of a quantized ExecuTorch program cannot be built")
    gen = torch.Generator().manual_seed(seed)
    count = {"calls": 0}

    def jittered(x: torch.Tensor) -> torch.Tensor:
        count["calls"] += 1
        noise = torch.randn(x.shape, generator=gen, dtype=torch.float32).to(x.dtype)
        return original(x * (1 + eps * noise))

    setattr(mod, _TORCHAO_ACT_QUANT, jittered)
    try:
        yield count
    finally:
        setattr(mod, _TORCHAO_ACT_QUANT, original)


def pooled_agreement(got: list[np.ndarray], want: list[np.ndarray]) -> tuple[float, float]:
    """(worst relative error over the shapes, top-1 agreement pooled over every position of
    every shape) of logits ``got`` against ``want``."""
    from edgeadapt.numeric import rel_error

    worst = max(rel_error(g, w) for g, w in zip(got, want, strict=True))
    same = sum(int((g.argmax(-1) == w.argmax(-1)).sum()) for g, w in zip(got, want, strict=True))
    total = sum(int(np.prod(w.shape[:-1])) for w in want)
    return worst, same / total


def reference_spread(ref: LoadedModel, input_names: list[str], shapes: list[tuple[int, int]],
                     want: list[np.ndarray] | None = None, draws: int = JITTER_DRAWS,
                     eps: float = JITTER_EPS, seed: int = 0) -> tuple[float, float]:
    """How far a quantized program's PyTorch reference (:func:`program_reference`) is from
    itself when its activation quantizers see float32 rounding noise
    (:func:`jittered_activations`, ``draws`` seeds): (the worst relative error, the least pooled
    top-1 agreement, :func:`pooled_agreement`) against ``want`` (its unjittered logits,
    :func:`~edgeadapt.export.executorch_verify.logits_at` on inputs ``seed``, computed if None).

    Why: torchao's eager linears quantize activations to int8 per token as XNNPACK's do
    (``IntxUnpackedToInt8Tensor``'s linear), and on each linear alone the two agree to float
    rounding (experiments/et_int8_linear_probe.py); but an activation a rounding away from a
    code boundary lands on the neighbouring code in one and not the other, a whole step, and
    such steps compound block after block. On SmolLM2-135M int8 (30 blocks, 8 x 64 random
    ids) this jitter alone moves torchao's own logits by 0.09-0.10 relative, top-1 0.79
    (experiments/et_int8_parity_probe.py), as far as ExecuTorch's program is from it; on a
    one-block model by 5e-7 to 1.2e-2. A program is held to this spread, not to a fixed
    tolerance (:func:`edgeadapt.bench.quantized_executorch.executorch_parity`). ExportError if
    the jitter reached no quantizer (nothing of ``ref`` is torchao's)."""
    from edgeadapt.export.executorch_verify import logits_at

    want = logits_at(ref, input_names, shapes, seed) if want is None else want
    worst, least = 0.0, 1.0
    for draw in range(draws):
        with jittered_activations(eps, draw) as count:
            got = logits_at(ref, input_names, shapes, seed)
        if not count["calls"]:
            raise ExportError(f"{ref.name}: no torchao activation quantization ran: not a "
                              "quantized reference")
        err, top1 = pooled_agreement(got, want)
        worst, least = max(worst, err), min(least, top1)
    return worst, least


def quant_gate(spread: float, spread_top1: float) -> dict[str, float]:
    """What a quantized program whose reference spreads by (``spread``, ``spread_top1``)
    (:func:`reference_spread`) is held to: ``{"max_rel_error": max(QUANT_MAX_REL_ERR,
    SPREAD_FACTOR * spread), "min_top1": spread_top1 - TOP1_MARGIN}`` (top-1 pooled,
    :func:`pooled_agreement`)."""
    return {"max_rel_error": max(QUANT_MAX_REL_ERR, SPREAD_FACTOR * spread),
            "min_top1": spread_top1 - TOP1_MARGIN}


def quant_tolerance(ref: LoadedModel, input_names: list[str],
                    shapes: list[tuple[int, int]], seed: int = 0) -> float:
    """The relative error a quantized program may reach against ``ref`` at ``shapes`` on
    inputs ``seed`` (:func:`quant_gate` of :func:`reference_spread`): the export checks'
    tolerance."""
    return quant_gate(*reference_spread(ref, input_names, shapes, seed=seed))["max_rel_error"]
