"""What every runtime switch test compares against: the PyTorch model carrying the same adapters
(read back from the bundle's files), and the relative error between two outputs; plus the
hand-made adapters those tests switch between."""

from __future__ import annotations

import numpy as np
import torch

from edgeadapt.adapters.reference import reference_model
from edgeadapt.export.bundle import export_base
from edgeadapt.format import (
    AdapterEntry,
    read_adapter,
    read_manifest,
    write_adapter,
    write_manifest,
)
from edgeadapt.format.fingerprint import weight_sha256
from edgeadapt.format.manifest import Manifest
from edgeadapt.format.types import Adapter, LoraDelta, ShiraDelta
from edgeadapt.models import example_inputs, forward, load_model
from edgeadapt.numeric import rel_error as parity  # noqa: F401 - the tests import it here


def torch_reference(lm, bundle, active, inputs) -> np.ndarray:
    """Logits of a copy of ``lm`` carrying ``active`` = [(adapter name, scale)] read from the
    bundle's adapter files (:func:`edgeadapt.adapters.reference.reference_model`)."""
    manifest = read_manifest(bundle)
    ref = reference_model(lm, [read_adapter(bundle / manifest.adapters[n].file) for n, _ in active],
                          [scale for _, scale in active])
    with torch.no_grad():
        return forward(ref, inputs).numpy()


def requested(bundle, names, scales=None) -> tuple[tuple[str, float], ...]:
    """The (name, scale) pairs a ``switch(names, scales)`` asks for, from the request alone:
    each explicit scale, else the adapter's own scale read from its file in the bundle."""
    names = [] if names is None else [names] if isinstance(names, str) else list(names)
    if scales is None:
        scales = [None] * len(names)
    elif not isinstance(scales, (list, tuple)):
        scales = [scales]
    manifest = read_manifest(bundle)
    return tuple((n, float(read_adapter(bundle / manifest.adapters[n].file).scale
                           if s is None else s))
                 for n, s in zip(names, scales, strict=True))


def random_adapters(lm, names: list[str], second: list[str], seed: int
                    ) -> tuple[Adapter, Adapter, Adapter]:
    """Hand-made adapters on ``lm``'s weights ``names``: SHiRA at 5% of every weight, SHiRA at 20%
    of ``second`` (overlapping the first), and a rank-2 LoRA on every other weight; values
    N(0, 1) (SHiRA) and 0.5 N(0, 1) (LoRA A, B), from ``np.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    w = {n: lm.model.get_parameter(n).detach().numpy() for n in names}
    sha = {n: weight_sha256(v) for n, v in w.items()}
    shapes = {n: tuple(v.shape) for n, v in w.items()}

    def shira(sel, density):
        t = {}
        for n in sel:
            idx = np.sort(rng.choice(w[n].size, int(density * w[n].size), replace=False))
            t[n] = ShiraDelta(idx.astype(np.int64),
                              rng.standard_normal(idx.size).astype(np.float32))
        return Adapter("shira", t, {n: shapes[n] for n in sel}, {n: sha[n] for n in sel})

    lora = {n: LoraDelta((0.5 * rng.standard_normal((2, w[n].shape[1]))).astype(np.float32),
                         (0.5 * rng.standard_normal((w[n].shape[0], 2))).astype(np.float32))
            for n in names[::2]}
    return (shira(names, 0.05), shira(second, 0.2),
            Adapter("lora", lora, {n: shapes[n] for n in lora}, {n: sha[n] for n in lora}))


def example_pair(lm):
    """Example inputs (batch 2, seq 7, seed 3) as torch tensors and as numpy arrays."""
    t = example_inputs(lm, batch=2, seq=7, seed=3)
    return t, {k: v.numpy() for k, v in t.items()}


def export_tiny(model: str, out, **load_kwargs) -> tuple[object, Manifest]:
    """Load ``model`` (seed 0, one torch thread) and export its ONNX bundle to ``out`` with the q/v
    weights live and no parity check; returns the loaded model and the bundle's manifest."""
    torch.set_num_threads(1)
    lm = load_model(model, seed=0, **load_kwargs)
    export_base(lm, out, backends="onnxruntime", targets="qv", check=False)
    return lm, read_manifest(out)


def register_adapters(bundle, manifest, adapters: dict[str, Adapter],
                      variants: dict[str, str | None] | None = None) -> None:
    """Write ``adapters`` (float32 values) as ``bundle/adapters/<name>.eadp``, register each in
    ``manifest`` (with its graph variant from ``variants``, if any) and write it."""
    (bundle / "adapters").mkdir(exist_ok=True)
    for name, ad in adapters.items():
        write_adapter(bundle / "adapters" / f"{name}.eadp", ad, value_dtype="float32")
        manifest.adapters[name] = AdapterEntry(file=f"adapters/{name}.eadp", method=ad.method,
                                               variant=(variants or {}).get(name))
    write_manifest(bundle, manifest)
