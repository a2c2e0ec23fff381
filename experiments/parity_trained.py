"""Backend parity of an exported bundle with *trained* adapters (not the benchmark's synthetic
ones): each run is exported into the bundle, switched in place on the backend, and the output
compared with the PyTorch model carrying the same adapter, at several shapes.

    .venv/bin/python -m experiments.parity_trained BUNDLE --backend executorch \
        --run hamlet=runs/mp/sm-hamlet-shira-snip-b8 [--run ...] [--shapes 1x1,1x64,8x64] \
        [--unfused]

``--unfused`` adds the benchmark's synthetic adapters for the bundle's graph variants (LoRA,
pruned SoRA, SiRA branches in the graph: ``edgeadapt.bench.adapters.collect``, registered in
memory only), each run unfused; a shape a static-shape variant was not lowered for is "-".

Error: ``max |backend - torch| / max |torch|`` (edgeadapt.numeric.rel_error), the
issue-4 rule (<= 1e-4 in fp32). Also prints the error of the PyTorch fp32 model itself against
a float64 copy of it, i.e. how far fp32 reordering alone moves the reference at that shape.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import numpy as np
import torch

from edgeadapt.bench.adapters import collect
from edgeadapt.bench.reference import TorchSubject
from edgeadapt.errors import ConfigError
from edgeadapt.export.adapter import export_adapter
from edgeadapt.format.adapter_file import read_adapter
from edgeadapt.format.manifest import read_manifest
from edgeadapt.models import forward
from edgeadapt.numeric import rel_error
from edgeadapt.runtime import load


def fp64_error(subject: TorchSubject, adapter, inputs: dict[str, np.ndarray],
               fp32: np.ndarray) -> float:
    """rel_error of ``fp32`` (the PyTorch reference for ``inputs``) against the same model run
    in float64."""
    from edgeadapt.adapters import apply_adapter_torch

    work = copy.copy(subject.lm)
    work.model = copy.deepcopy(subject.lm.model).double()
    if adapter is not None:
        apply_adapter_torch(work.model, adapter, scale=adapter.scale)
    feeds = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
    with torch.no_grad():
        want = forward(work, feeds).numpy()
    return rel_error(fp32, want)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--backend", default="executorch")
    ap.add_argument("--mode", default="live")
    ap.add_argument("--run", action="append", default=[], help="NAME=RUN_DIR")
    ap.add_argument("--shapes", default="1x1,1x64,8x64")
    ap.add_argument("--fp64", action="store_true", help="also the fp32-vs-fp64 error")
    ap.add_argument("--unfused", action="store_true",
                    help="also synthetic adapters for the bundle's unfused graph variants")
    args = ap.parse_args()
    torch.set_num_threads(1)
    names = []
    for spec in args.run:
        name, run = spec.split("=", 1)
        if not any(args.bundle.glob(f"adapters/{name}.*")):
            export_adapter(run, args.bundle, name)
        names.append(name)
    manifest = read_manifest(args.bundle)
    subject = TorchSubject(manifest, args.bundle)
    rt = load(args.bundle, backend=args.backend, mode=args.mode, threads=1)
    adapters = {n: read_adapter(next(args.bundle.glob(f"adapters/{n}.*")), manifest)
                for n in names}
    if args.unfused:
        scratch = Path(tempfile.mkdtemp(prefix="parity-"))
        aset = collect(args.bundle, rt.manifest, scratch)
        aset.register(rt.manifest)
        extra = [n for m in ("lora", "sora", "sira") for n in aset.of(m, fused=False)]
        adapters.update({n: aset.adapters[n] for n in extra})
        names += extra
    print(f"| adapter | {' | '.join(args.shapes.split(','))} |")
    print("|---|" + "---|" * len(args.shapes.split(",")))
    for name in [None, *names]:
        cells = []
        rt.switch(name)
        for shape in args.shapes.split(","):
            b, s = (int(v) for v in shape.split("x"))
            x = subject.inputs(b, s)
            adapter = adapters.get(name)
            try:
                got = rt.run(**x)
            except ConfigError:  # a static-shape program not lowered for this shape
                cells.append("-")
                continue
            want = subject.reference(adapter, x)
            cell = f"{rel_error(got, want):.1e}"
            if args.fp64:
                cell += f" (fp32 vs fp64 {fp64_error(subject, adapter, x, want):.1e})"
            cells.append(cell)
        print(f"| {name or 'base'} | {' | '.join(cells)} |", flush=True)
    rt.switch(None)


if __name__ == "__main__":
    main()
