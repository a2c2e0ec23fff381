"""ExecuTorch's rows of the quantized-base benchmark (:mod:`edgeadapt.bench.quantized`):
per precision the live program of a bundle exported into ``work/executorch-<precision>``
(base and SHiRA fused, held to PyTorch before timing) and ExecuTorch's own quantized program
of the same weights (``stock``: every Linear of the blocks, q/v included, quantized by torchao
and lowered whole to XNNPACK, :func:`edgeadapt.export.executorch_quant.stock_program`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgeadapt.bench.quantized import (
    Forward,
    Side,
    ensure_bundle,
    expected_live,
    open_side,
)
from edgeadapt.errors import ConfigError, ExportError, ParityError
from edgeadapt.format import read_manifest
from edgeadapt.format.container import atomic_write_bytes
from edgeadapt.format.types import Adapter
from edgeadapt.models import LoadedModel


def executorch_side(model: str | LoadedModel, lm: LoadedModel, work: Path, threads: int,
                    precisions: Sequence[str], adapters: list[Adapter],
                    shapes: Sequence[tuple[int, int]], parity: dict) -> Side:
    """ExecuTorch's runtimes, held to PyTorch at ``shapes`` (:func:`executorch_parity`, into
    ``parity["executorch_vs_pytorch"]``), and ExecuTorch's stock quantized programs."""
    bundles = {p: ensure_bundle(model, work, p, "executorch") for p in precisions}
    side = open_side("executorch", bundles, lm, adapters, threads)
    parity["executorch_vs_pytorch"] = {p: executorch_parity(side, lm, p, adapters[0], shapes)
                                       for p in precisions}
    side.peers["stock"] = {}
    for p, bundle in bundles.items():
        section = read_manifest(bundle).executorch
        side.sizes[p] = {"pte_bytes": (bundle / section["file"]).stat().st_size}
        if p != "fp32":
            path = ensure_executorch_stock(lm, work, p, section)
            side.peers["stock"][p] = executorch_forward(path)
            side.sizes[p]["stock_pte_bytes"] = path.stat().st_size
    return side


def executorch_parity(side: Side, lm: LoadedModel, precision: str, adapter: Adapter,
                      shapes: Sequence[tuple[int, int]]) -> dict[str, float]:
    """Worst relative error and top-1 agreement over ``shapes`` of ExecuTorch's base and fused
    runtimes against the PyTorch model the program is held to at export
    (:func:`~edgeadapt.export.executorch_quant.program_reference`: ``lm`` for fp32, torchao's
    quantized copy otherwise) holding the live values each must hold (:func:`expected_live`);
    ParityError past the gate, before anything is timed.

    The gate: fp32, the benchmark's rule for every timed case
    (:data:`~edgeadapt.bench.parity.PARITY_TOL`; fp32 SmolLM2 at 8x64 with a 1% adapter sits at
    1.6e-4, past the export check's 1e-4 on its small shapes). Quantized: the reference's own
    spread (:func:`~edgeadapt.export.executorch_quant.reference_spread`: the same torchao
    model, its int8 per-token activations quantized as XNNPACK's are, against itself with
    float32-rounding noise on every activation quantizer's input). The activation codes of
    XNNPACK and torchao differ now and then by one step where a value sits a rounding from a
    code boundary, and over SmolLM2's 30 blocks such steps compound (int8: 0.09-0.10 relative,
    top-1 0.79 at 8 x 64 for torchao against itself: experiments/et_int8_parity_probe.py), so
    no fixed tolerance holds a deep model; the program must stay within
    :func:`~edgeadapt.export.executorch_quant.quant_gate` of it (``SPREAD_FACTOR`` times the
    spread's worst relative error, at least ``QUANT_MAX_REL_ERR``; its top-1 agreement, pooled
    over the positions of every shape, at most ``TOP1_MARGIN`` below the spread's least). Float
    activations in place of int8 ones (SmolLM2: 0.34 relative) or a wrong live weight fail it;
    the codes themselves are checked exactly (:func:`check_codes`) and the kernels against numpy
    in the tests."""
    from edgeadapt.bench.parity import PARITY_TOL
    from edgeadapt.export.executorch_quant import (
        SPREAD_FACTOR,
        TOP1_MARGIN,
        pooled_agreement,
        program_reference,
        quant_gate,
        reference_spread,
    )
    from edgeadapt.export.executorch_verify import agreement, logits_at, program_logits

    base = side.base[precision]
    ref, tol = program_reference(lm, sorted(base.store.live_weights()), precision)
    quantized = precision != "fp32"
    out: dict = {"tolerance": None if quantized else max(tol, PARITY_TOL),
                 "spread_factor": SPREAD_FACTOR if quantized else None,
                 "top1_margin": TOP1_MARGIN if quantized else None}
    for case, rt, fused in (("base", base, None),
                            ("shira-fused", side.fused[precision], adapter)):
        what = f"executorch {precision} {case}"
        bad = [(b, s) for b, s in shapes
               if not (b <= rt.store.max_batch and s <= rt.store.max_seq)]
        if bad:
            raise ConfigError(f"{what}: the program takes batch <= {rt.store.max_batch}, seq <= "
                              f"{rt.store.max_seq}; the bench's shapes {bad} do not fit")
        held = with_live(ref, expected_live(lm, rt, fused))
        if not quantized:
            try:
                err, top1 = agreement(rt.store, held, list(shapes), what, tol=out["tolerance"])
            except ExportError as exc:
                raise ParityError(f"{exc}; refusing to time it") from exc
            out[case], out[f"{case}_top1"] = err, top1
            continue
        names, shapes_ = rt.store.input_names, list(shapes)
        want = logits_at(held, names, shapes_)
        err, top1 = pooled_agreement(program_logits(rt.store, held, shapes_), want)
        spread, spread_top1 = reference_spread(held, names, shapes_, want)
        gate = quant_gate(spread, spread_top1)
        out |= {case: err, f"{case}_top1": top1, f"{case}_spread": spread,
                f"{case}_spread_top1": spread_top1, f"{case}_gate": gate}
        check_quant_gate(what, err, top1, gate)
    return out


def check_quant_gate(what: str, err: float, top1: float, gate: dict[str, float]) -> None:
    """ParityError unless relative error ``err`` and pooled top-1 agreement ``top1`` are within
    ``gate`` (:func:`~edgeadapt.export.executorch_quant.quant_gate`; a NaN fails)."""
    if not (err <= gate["max_rel_error"] and top1 >= gate["min_top1"]):
        raise ParityError(
            f"{what}: relative error {err:.3g} (gate {gate['max_rel_error']:.3g}), top-1 "
            f"agreement {top1:.3f} (gate {gate['min_top1']:.3f}) against PyTorch, beyond its "
            "reference's own spread under float32 rounding noise; refusing to time it")


def with_live(ref: LoadedModel, values: dict[str, np.ndarray]) -> LoadedModel:
    """A copy of LoadedModel ``ref`` whose live weights (parameters, or the codes buffers of
    a quantized program's model, by torch name) hold ``values``."""
    import copy
    import dataclasses

    import torch

    from edgeadapt.export.executorch_live_form import QKernelLinear

    model = copy.deepcopy(ref.model)
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for w, value in values.items():
            module = model.get_submodule(w.rpartition(".")[0])
            if isinstance(module, QKernelLinear) and w.endswith(".weight"):
                module.set_codes(value)  # int4: packed two per byte
            else:
                tensors[w].copy_(torch.from_numpy(value))
    return dataclasses.replace(ref, model=model)


def ensure_executorch_stock(lm: LoadedModel, work: Path, precision: str, section: dict) -> Path:
    """``work/executorch-<precision>-stock.pte``: ExecuTorch's own quantized program of the
    same weights (:func:`~edgeadapt.export.executorch_quant.stock_program`: every quantized
    weight, q/v included, by torchao, lowered whole to XNNPACK), for the bundle's shapes;
    written when missing."""
    path = work / f"executorch-{precision}-stock.pte"
    if not path.is_file():
        from edgeadapt.export.executorch_quant import stock_program

        atomic_write_bytes(path, [stock_program(lm, precision, int(section["max_batch"]),
                                                int(section["max_seq"]))])
    return path


def executorch_forward(path: Path) -> Forward:
    """The forward of the .pte at ``path`` on ExecuTorch's runtime (its threadpool as the
    bundles' runtimes sized it)."""
    import torch
    from executorch.runtime import Runtime as EtRuntime

    program = EtRuntime.get().load_program(path)
    method = program.load_method("forward")

    def forward(ids: np.ndarray, program=program) -> np.ndarray:  # keeps the program alive
        return method.execute([torch.from_numpy(ids)])[0].numpy()

    return forward
