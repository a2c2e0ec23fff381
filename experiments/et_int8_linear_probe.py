"""One quantized Linear of SmolLM2 alone: XNNPACK's dynamically quantized linear (lowered by
ExecuTorch from torchao's ``Int8DynamicActivationIntxWeightConfig``, as the rest of an int8
bundle is) against torchao's eager linear and against :func:`xnnpack_qd8` emulation, on the
linear's real input (SmolLM2 fp32 on 8 x 64 random ids, block ``--block``).

    .venv/bin/python -m experiments.et_int8_linear_probe --block 0

Prints per linear: relative error and mean |d| / mean |ref| of ExecuTorch against eager torchao
(per-token int8 activations), against the emulation of XNNPACK's own activation quantizer, and
against float activations (dequantized weights only).
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import torch
from torch import nn

from edgeadapt.models import LogitsModule, example_inputs, load_model
from edgeadapt.numeric import rel_error
from experiments.et_int8_parity_probe import XnnEmulation, et_run, set_act_quant


def lower_linear(linear: nn.Module, x: torch.Tensor) -> bytes:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    ep = torch.export.export(linear, (x,), strict=False)
    edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
    return bytes(edge.to_executorch().buffer)


def stats(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> str:
    a, b = np.asarray(a), np.asarray(b)
    return f"rel {rel_error(a, b):.2e} mean {np.abs(a - b).mean() / np.abs(b).mean():.2e}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--block", type=int, default=0)
    ap.add_argument("--precision", default="int8")
    args = ap.parse_args()
    from torchao.quantization import quantize_

    from edgeadapt.export.executorch_quant import rest_config
    from edgeadapt.format.quant import grid

    lm = load_model("smollm2")
    ids = example_inputs(lm, batch=8, seq=64, seed=0)["input_ids"]
    layer = lm.model.model.layers[args.block]
    names = ["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"]
    captured = {}
    hooks = [layer.get_submodule(n).register_forward_hook(
        lambda m, i, o, n=n: captured.__setitem__(n, i[0].detach().clone())) for n in names]
    with torch.no_grad():
        LogitsModule(lm)(input_ids=ids)
    for h in hooks:
        h.remove()
    for n in names:
        x = captured[n]
        lin = copy.deepcopy(layer.get_submodule(n))
        wrapper = nn.Sequential(lin)
        with torch.no_grad():
            quantize_(wrapper, rest_config(grid(args.precision)))
            blob = lower_linear(wrapper, x)
            et = et_run(blob, x)
            act = wrapper(x).numpy()
            with XnnEmulation():
                emu = wrapper(x).numpy()
            set_act_quant(wrapper, None)
            noact = wrapper(x).numpy()
        amax = x.abs().amax(-1)
        print(f"block {args.block} {n:18s} |x| row max: median {amax.median():.3g} "
              f"max {amax.max():.3g}", flush=True)
        print(f"    ET vs torchao eager (int8 act)  {stats(et, act)}")
        print(f"    ET vs XNNPACK-quantizer emul.   {stats(et, emu)}")
        print(f"    emul. vs torchao eager          {stats(emu, act)}")
        print(f"    ET vs float activations         {stats(et, noact)}")
        print(f"    torchao eager vs float act.     {stats(act, noact)}", flush=True)


if __name__ == "__main__":
    main()
