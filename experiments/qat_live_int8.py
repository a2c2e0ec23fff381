"""Quantization-aware SHiRA with the live (adapted) weights on the int8 grid and the rest on
``--quant``'s, a mix no bundle exports yet (docs/results.md, "SmolLM2 on int4-affine")::

    .venv/bin/python -m experiments.qat_live_int8 train --model smollm2 --task hamlet \\
        --max-len 128 --seed 0 --steps 30 --batch-size 8 --method shira --mask snip \\
        --budget-rank 8 --quant int4-affine --out runs/mp/sm-hamlet-qat-a-live-int8

The arguments are ``edgeadapt``'s. The one change: every weight the PyTorch reference
(``edgeadapt.models.quantized.quantize_reference_``) quantizes whose name holds one of
``--live`` (default ``.q_proj.,.v_proj.``, the default targets) goes on the int8 grid, the
others on the grid ``--quant`` gives them. The run trains and evaluates on that reference, as
``edgeadapt train --quant`` does on a bundle's; its perplexity is in its ``metrics.json``.
Its run directory records ``--quant`` alone, so ``edgeadapt.train.load_run`` rebuilds it on the
unmixed reference: evaluate it from the run's own metrics, not by reloading it.
"""

from __future__ import annotations

import sys

import edgeadapt.models.quantized as reference
from edgeadapt.format.quant import grid

LIVE = (".q_proj.", ".v_proj.")


def main() -> None:
    args = sys.argv[1:]
    live = LIVE
    if "--live" in args:
        at = args.index("--live")
        live = tuple(args[at + 1].split(","))
        del args[at:at + 2]
    policy = reference.quantized_weight_grids

    def mixed(lm_model, kind, precision, names=None):
        grids = policy(lm_model, kind, precision, names)
        return {n: grid("int8") if any(p in n for p in live) else g for n, g in grids.items()}

    reference.quantized_weight_grids = mixed
    from edgeadapt.cli import main as edgeadapt

    sys.argv = ["edgeadapt", *args]
    edgeadapt()


if __name__ == "__main__":
    main()
