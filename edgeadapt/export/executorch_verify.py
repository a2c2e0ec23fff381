"""Export-time checks of an ExecuTorch export: the programs run and match PyTorch, and every
recorded buffer name / byte offset holds the weight it claims (checked by value and by edits).

Relative error (:func:`edgeadapt.numeric.rel_error`): ``max |y_et - y_pt| / max |y_pt|``
<= 1e-4 (fp32), else ExportError. Quantized programs, against the PyTorch model holding the same
quantized weights: within :func:`edgeadapt.export.executorch_quant.quant_tolerance` (at least
``QUANT_MAX_REL_ERR``, more where the reference's int8 activations spread under float32
rounding noise, as over SmolLM2's 30 blocks).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from edgeadapt.errors import BundleError, ExportError
from edgeadapt.format.layout import to_backend
from edgeadapt.models import LoadedModel, LogitsModule
from edgeadapt.numeric import rel_error

MAX_REL_ERR = 1e-4


def check_shapes(max_batch: int, max_seq: int) -> list[tuple[int, int]]:
    """The (batch, seq) shapes checked: 1x1, 1 x max_seq, max_batch x max_seq."""
    return [(1, 1), (1, max_seq), (max_batch, max_seq)]


def _inputs(lm: LoadedModel, names: list[str], batch: int, seq: int, seed: int
            ) -> dict[str, np.ndarray]:
    from edgeadapt.models import example_inputs

    ex = example_inputs(lm, batch=batch, seq=seq, seed=seed)
    return {n: ex[n].numpy() for n in names}


def compare(store, lm: LoadedModel, shapes: list[tuple[int, int]], what: str,
            seed: int = 0, tol: float = MAX_REL_ERR) -> float:
    """Worst relative error of ``store.run`` against ``lm`` over ``shapes``; ExportError past
    ``tol``."""
    return agreement(store, lm, shapes, what, seed, tol)[0]


def logits_at(lm: LoadedModel, input_names: list[str], shapes: list[tuple[int, int]],
              seed: int = 0) -> list[np.ndarray]:
    """``lm``'s logits on the checks' random inputs (``seed``) at each (batch, seq) shape."""
    wrapper = LogitsModule(lm)
    out = []
    with torch.no_grad():
        for b, s in shapes:
            inp = _inputs(lm, input_names, b, s, seed)
            out.append(wrapper(**{k: torch.from_numpy(v) for k, v in inp.items()}).numpy())
    return out


def program_logits(store, lm: LoadedModel, shapes: list[tuple[int, int]], seed: int = 0
                   ) -> list[np.ndarray]:
    """``store.run``'s logits on the inputs :func:`logits_at` gives ``lm`` at each shape."""
    return [np.asarray(store.run(_inputs(lm, store.input_names, b, s, seed)))
            for b, s in shapes]


def agreement(store, lm: LoadedModel, shapes: list[tuple[int, int]], what: str,
              seed: int = 0, tol: float = math.inf) -> tuple[float, float]:
    """(worst relative error, least top-1 agreement: the share of positions whose argmax
    equals PyTorch's) of ``store.run`` against ``lm`` over ``shapes``; ExportError past
    ``tol``."""
    worst, top1 = 0.0, 1.0
    for shape in shapes:
        ref = logits_at(lm, store.input_names, [shape], seed)[0]
        got = program_logits(store, lm, [shape], seed)[0]
        if got.shape != ref.shape:
            raise ExportError(f"{what}: output shape {got.shape} != PyTorch {ref.shape}")
        err = rel_error(got, ref)
        worst = max(worst, err)
        top1 = min(top1, float((got.argmax(-1) == ref.argmax(-1)).mean()))
        if not err <= tol:
            raise ExportError(f"{what}: batch {shape[0]} x seq {shape[1]}: max relative error "
                              f"{err:.3g} > {tol:g} against PyTorch")
    return worst, top1


def random_edit(live_lm: LoadedModel, store, seed: int = 1) -> None:
    """Write random new values into every live weight and branch tensor of ``store`` and the
    same values into ``live_lm`` (whose live weights and branch tensors are buffers)."""
    gen = torch.Generator().manual_seed(seed)
    model = live_lm.model
    with torch.no_grad():
        for w, lw in store.live_weights().items():
            buf = model.get_buffer(w)
            if lw.packed:  # int4 codes two per byte: the codes a step or two, repacked
                codes = torch.from_numpy(lw.torch_weight())
                step = torch.randint(-2, 3, codes.shape, generator=gen, dtype=torch.int16)
                grid = lw.codes.grid
                new = (codes.to(torch.int16) + step).clamp(grid.qmin, grid.qmax)
                lw.write(to_backend(new.to(torch.int8).numpy(), lw.layout))
                buf.copy_(torch.from_numpy(lw.array))
                continue
            if buf.is_floating_point():
                new = buf + 0.5 * buf.std() * torch.randn(buf.shape, generator=gen)
            else:  # int8 codes: a step or two up or down
                step = torch.randint(-2, 3, buf.shape, generator=gen, dtype=torch.int16)
                new = (buf.to(torch.int16) + step).clamp(-128, 127).to(torch.int8)
            buf.copy_(new)
            lw.torch_view()[...] = new.numpy()
        for w, params in store.branch_tensors().items():
            prefix = w.removesuffix("weight")
            for p, arr in params.items():
                buf = model.get_buffer(prefix + p)
                new = 0.05 * torch.randn(buf.shape, generator=gen)
                buf.copy_(new)
                arr[...] = new.numpy()
    store.commit({w: None for w in store.live_weights()})


def verify_export(live_lm: LoadedModel, out_dir: Path, result: dict) -> dict[str, float]:
    """Load the written programs and check them (module doc). ``live_lm`` is edited in place.

    Returns the worst relative errors {"base", "edited", "repack_base", "repack_edited"}.
    """
    from edgeadapt.runtime.backends.executorch.store import ExecutorchStore

    section, weights = result["section"], result["weights"]
    buffers = {w: info["buffer"] for w, info in weights.items()}
    from edgeadapt.export.executorch_quant import QUANT_MAX_REL_ERR, quant_entries

    quant = quant_entries(result)
    tol = QUANT_MAX_REL_ERR if quant else MAX_REL_ERR
    shapes = {w: tuple(info["shape"]) for w, info in weights.items()}
    static = section["methods"].get("static")
    grid = ([tuple(int(v) for v in k.split("x")) for k in static] if static
            else check_shapes(section["max_batch"], section["max_seq"]))
    errs: dict[str, float] = {}

    try:
        store = ExecutorchStore(out_dir, section, buffers, shapes, mode="live", quant=quant)
    except BundleError as exc:
        raise ExportError(f"the forward method does not read the live weights as mutable "
                          f"buffers (packed as constants?): {exc}") from exc
    for w, lw in store.live_weights().items():
        if not np.array_equal(lw.array, live_lm.model.get_buffer(w).numpy()):
            raise ExportError(f"buffer {buffers[w]!r} does not hold weight {w!r}")
    if quant:  # the reference's own spread (executorch_quant.reference_spread)
        from edgeadapt.export.executorch_quant import quant_tolerance

        tol = quant_tolerance(live_lm, store.input_names, grid)
    errs["base"] = compare(store, live_lm, grid, "executorch live program", tol=tol)
    repack = section.get("repack") is not None
    if repack:
        const = ExecutorchStore(out_dir, section, buffers, shapes, mode="repack")
        for w, lw in const.live_weights().items():
            if not np.array_equal(lw.torch_view(), live_lm.model.get_buffer(w).numpy()):
                raise ExportError(f"repack offset of {w!r} does not hold the weight")
        errs["repack_base"] = compare(const, live_lm, grid[:1], "executorch constant program")
    random_edit(live_lm, store)
    if quant:
        tol = quant_tolerance(live_lm, store.input_names, grid[:2])
    errs["edited"] = compare(store, live_lm, grid[:2], "executorch live program after edits",
                             tol=tol)
    if repack:
        for w, lw in const.live_weights().items():
            lw.torch_view()[...] = live_lm.model.get_buffer(w).numpy()
        const.commit({w: None for w in const.live_weights()})
        errs["repack_edited"] = compare(const, live_lm, grid[:2],
                                        "executorch constant program after repack")
    return errs
