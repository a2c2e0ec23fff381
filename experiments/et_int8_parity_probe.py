"""Why ExecuTorch's int8 SmolLM2 program misses torchao's eager copy of the same quantized model
(docs/quantized.md, "Measured": 0.119 relative, top-1 0.688): compounding of XNNPACK's per-token
int8 activations, or a fault? SmolLM2-135M's real weights cut to its first ``n`` blocks.

    .venv/bin/python -m experiments.et_int8_parity_probe --depths 1,2,4,8,16,30

Per depth (``--shape`` tokens, random ids as the bench draws them, seed 0), each line a relative
error (``max |a - b| / max |b|``) and the top-1 agreement of a against b:

- ``live``: the ExecuTorch live int8 program (q/v: edgeadapt's kernel, float activations; the
  rest: XNNPACK's dynamically quantized linears) vs torchao's eager copy it was lowered from
  (:func:`~edgeadapt.export.executorch_quant.quantized_live_model`), which quantizes every rest
  linear's activation to int8 per token (``IntxUnpackedToInt8Tensor``'s linear:
  ``_apply_int8_act_asym_per_token_quant_dequant``), as XNNPACK does;
- ``live_vs_noact``: the same program vs the same eager copy with activation quantization off
  (float activations, dequantized weights);
- ``eager_act_vs_noact``: torchao's eager copy with vs without activation quantization (what the
  int8 activations themselves move, in PyTorch alone);
- ``eager_noact_vs_fp32``: the copy without activation quantization vs the fp32 model (what the
  int8 weights alone move);
- ``stock``: ExecuTorch's stock int8 program (every linear on XNNPACK,
  :func:`~edgeadapt.export.executorch_quant.stock_program`) vs its eager torchao copy (``--stock``);
- ``fp32``: the fp32 ExecuTorch live program vs the fp32 model (``--fp32``);
- ``live_vs_xnn_emulation``: the live program vs the eager copy with each activation quantized
  the way XNNPACK's ``f32-qd8`` convert does it (:func:`xnnpack_qd8`).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeadapt.models import LogitsModule, example_inputs, load_model
from edgeadapt.numeric import rel_error


def truncated(lm, n: int):
    model = copy.deepcopy(lm.model)
    model.model.layers = nn.ModuleList(list(model.model.layers)[:n])
    model.config.num_hidden_layers = n
    if hasattr(model.config, "layer_types") and model.config.layer_types:
        model.config.layer_types = model.config.layer_types[:n]
    return dataclasses.replace(lm, model=model)


def intx_weights(model: nn.Module):
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8Tensor,
    )

    return [m.weight for m in model.modules()
            if isinstance(getattr(m, "weight", None), IntxUnpackedToInt8Tensor)]


def set_act_quant(model: nn.Module, on) -> None:
    """Activation quantization of every torchao linear: the given enum value or None (off)."""
    for w in intx_weights(model):
        w.activation_quantization = on


def xnnpack_qd8(x: torch.Tensor) -> torch.Tensor:
    """XNNPACK's f32-qd8 convert per row (``xnn_qd8_asymmetric_quantization_params``,
    ``src/xnnpack/quantization.h``), dequantized: ``rmin = min(row, 0)``, ``rmax = max(row,
    0)``, multiplier ``m = 255 / (rmax - rmin)`` (1 where equal), zero point ``-128 - rmin m``
    or ``127 - rmax m`` (the side with the smaller error), clamped, ``lrintf``; codes
    ``clamp(rint(x m) + zp, -128, 127)``; the GEMM scales by ``1 / m``. torchao instead takes
    ``scale = (rmax - rmin) / 255``, ``zp = -128 - round(rmin / scale)``, codes
    ``round(x * (1 / scale)) + zp``: the same grid up to float rounding of the scale."""
    x32 = x.float()
    rmin = torch.clamp(x32.amin(-1, keepdim=True), max=0.0)
    rmax = torch.clamp(x32.amax(-1, keepdim=True), min=0.0)
    m = torch.where(rmin == rmax, torch.ones_like(rmin), 255.0 / (rmax - rmin))
    dmin, dmax = rmin * m, rmax * m
    zp = torch.where((-128.0 + dmin) + (127.0 + dmax) > 0, -128.0 - dmin, 127.0 - dmax)
    zp = torch.round(torch.clamp(zp, -128.0, 127.0))
    q = torch.clamp(torch.round(x32 * m) + zp, -128, 127)
    return ((q - zp) * (1.0 / m)).to(x.dtype)


class XnnEmulation:
    """Context: torchao's activation quantization replaced by :func:`xnnpack_qd8`."""

    def __enter__(self):
        import importlib

        m = importlib.import_module(
            "torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor")
        self.mod, self.saved = m, m._apply_int8_act_asym_per_token_quant_dequant
        m._apply_int8_act_asym_per_token_quant_dequant = xnnpack_qd8
        return self

    def __exit__(self, *exc):
        self.mod._apply_int8_act_asym_per_token_quant_dequant = self.saved


def eager(lm, ids: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return LogitsModule(lm)(input_ids=ids).numpy()


def et_run(blob: bytes, ids: torch.Tensor) -> np.ndarray:
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(blob)
    return program.load_method("forward").execute([ids])[0].numpy()


def cmp(a: np.ndarray, b: np.ndarray) -> str:
    return (f"rel {rel_error(a, b):.3e}  top1 {float((a.argmax(-1) == b.argmax(-1)).mean()):.3f}"
            f"  mean|d|/mean|b| {np.abs(a - b).mean() / np.abs(b).mean():.3e}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depths", default="1,2,4,8,16,30")
    ap.add_argument("--precision", default="int8")
    ap.add_argument("--shape", default="8x64")
    ap.add_argument("--stock", action="store_true")
    ap.add_argument("--fp32", action="store_true")
    ap.add_argument("--no-live", action="store_true", help="eager comparisons only")
    ap.add_argument("--jitter", type=float, default=0.0,
                    help="run :func:`sensitivity` with this eps instead")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    if args.jitter:
        sensitivity([int(d) for d in args.depths.split(",")], args.precision, args.jitter,
                     args.seeds, tuple(int(v) for v in args.shape.split("x")))
        return
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8TensorActivationQuantization as Act,
    )

    from edgeadapt.export.executorch import export_pte, lower_const
    from edgeadapt.export.executorch_quant import quantized_live_model
    from edgeadapt.models.targets import target_weight_names
    from edgeadapt.runtime.backends.executorch.kernel import load_kernel

    load_kernel()
    torch.manual_seed(0)
    full = load_model("smollm2")
    b, s = (int(v) for v in args.shape.split("x"))
    ids = example_inputs(full, batch=b, seq=s, seed=0)["input_ids"]
    p = args.precision
    for n in (int(d) for d in args.depths.split(",")):
        t0 = time.time()
        lm = truncated(full, n)
        live = target_weight_names(lm.model, "qv")
        ref, _ = quantized_live_model(lm, live, p)
        fp = eager(lm, ids)
        act = eager(ref, ids)
        with XnnEmulation():
            emu = eager(ref, ids)
        set_act_quant(ref.model, None)
        noact = eager(ref, ids)
        set_act_quant(ref.model, Act.INT8_ASYM_PER_TOKEN)
        print(f"[{n} blocks] eager_act_vs_noact   {cmp(act, noact)}", flush=True)
        print(f"[{n} blocks] eager_noact_vs_fp32  {cmp(noact, fp)}", flush=True)
        print(f"[{n} blocks] eager_xnnemu_vs_act  {cmp(emu, act)}", flush=True)
        if not args.no_live:
            with tempfile.TemporaryDirectory() as d:
                export_pte(lm, Path(d), live, max_batch=8, max_seq=64, repack=False,
                           verify=False, precision=p)
                blob = (Path(d) / "model.pte").read_bytes()
            et = et_run(blob, ids)
            print(f"[{n} blocks] live                 {cmp(et, act)}", flush=True)
            print(f"[{n} blocks] live_vs_noact        {cmp(et, noact)}", flush=True)
            print(f"[{n} blocks] live_vs_xnn_emulation {cmp(et, emu)}", flush=True)
        if args.stock:
            sref, _ = quantized_live_model(lm, [], p)
            with torch.no_grad():
                sblob, outside = lower_const(sref, 8, 64)
            st = et_run(sblob, ids)
            sact = eager(sref, ids)
            with XnnEmulation():
                semu = eager(sref, ids)
            print(f"[{n} blocks] stock (outside {outside})  {cmp(st, sact)}", flush=True)
            print(f"[{n} blocks] stock_vs_xnn_emulation {cmp(st, semu)}", flush=True)
        if args.fp32:
            with tempfile.TemporaryDirectory() as d:
                export_pte(lm, Path(d), live, max_batch=8, max_seq=64, repack=False,
                           verify=False)
                blob = (Path(d) / "model.pte").read_bytes()
            print(f"[{n} blocks] fp32                 {cmp(et_run(blob, ids), fp)}", flush=True)
        print(f"[{n} blocks] ({time.time() - t0:.0f} s)", flush=True)



class Jitter:
    """Context: every torchao activation quantization (per token, int8) sees its input times
    ``1 + eps * N(0, 1)`` (a float32 rounding's size at eps ~ 6e-8): how far the reference itself
    moves when XNNPACK's float arithmetic differs from PyTorch's by an ulp."""

    def __init__(self, eps: float, seed: int) -> None:
        self.eps, self.gen = eps, torch.Generator().manual_seed(seed)

    def __enter__(self):
        import importlib

        m = importlib.import_module(
            "torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor")
        self.mod, self.saved = m, m._apply_int8_act_asym_per_token_quant_dequant
        saved, eps, gen = self.saved, self.eps, self.gen
        m._apply_int8_act_asym_per_token_quant_dequant = lambda x: saved(
            x * (1 + eps * torch.randn(x.shape, generator=gen)))
        return self

    def __exit__(self, *exc):
        self.mod._apply_int8_act_asym_per_token_quant_dequant = self.saved


def sensitivity(depths: list[int], precision: str, eps: float, seeds: int,
                shape: tuple[int, int]) -> None:
    """torchao's eager int8 copy (q/v live as the bundle's) against itself with :class:`Jitter`
    (``seeds`` draws), per depth; the fp32 model with the same jitter on its linears' inputs as a
    control (no activation quantization: the jitter stays at its size)."""
    from edgeadapt.export.executorch_quant import quantized_live_model
    from edgeadapt.models.targets import target_weight_names

    full = load_model("smollm2")
    ids = example_inputs(full, batch=shape[0], seq=shape[1], seed=0)["input_ids"]
    for n in depths:
        lm = truncated(full, n)
        ref, _ = quantized_live_model(lm, target_weight_names(lm.model, "qv"), precision)
        act = eager(ref, ids)
        fp = eager(lm, ids)
        for seed in range(seeds):
            with Jitter(eps, seed):
                jit = eager(ref, ids)
            gen = torch.Generator().manual_seed(seed)
            hooks = [m.register_forward_pre_hook(
                lambda mod, inp, gen=gen: (
                    inp[0] * (1 + eps * torch.randn(inp[0].shape, generator=gen)),))
                for m in lm.model.modules() if isinstance(m, nn.Linear)]
            fj = eager(lm, ids)
            for h in hooks:
                h.remove()
            print(f"[{n} blocks] jitter {eps:g} seed {seed}: int8 {cmp(jit, act)} | "
                  f"fp32 control rel {rel_error(fj, fp):.2e}", flush=True)


if __name__ == "__main__":
    main()
