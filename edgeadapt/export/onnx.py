"""Export a base model to ONNX in the layout the in-place runtime needs.

Only the *live* weights (the ones adapters may edit) become graph inputs; every other weight stays
a constant initializer in external data, which ONNX Runtime prepacks. The torch exporter stores
most Linear weights transposed under generated names (``val_N``, shape (in, out)), so each live
weight is located by value (hash of W and of W.T), its layout recorded, and the graph checked so
the MatMul/Gemm kernel reads that very tensor (see :mod:`edgeadapt.export.onnx_graph`).

Layout of a live input, for torch weight ``W (out, in)``:

- ``"as-is"``: input shape (out, in), ``X.flat[i] == W.flat[i]``.
- ``"transposed"``: input shape (in, out), ``X = W.T``; torch flat index ``i`` is ONNX flat index
  ``(i % in) * out + i // in``, and ONNX flat index ``j`` holds ``W[j % out, j // out]``
  (:func:`edgeadapt.export.onnx_graph.torch_flat_to_backend_flat`).
- ``"blocked32"`` (the default for weights read only by MatMul): input shape (out/32, in, 32),
  ``X[b, c, j] = W[32 b + j, c]``; torch ``i = r * in + c`` is ONNX
  ``(r // 32) * in * 32 + c * 32 + r % 32`` (:mod:`edgeadapt.format.layout`).

Files written to ``out_dir`` (all atomically): ``model.onnx`` (or ``model.<variant>.onnx`` for a
branch variant), its external data ``model.onnx.data`` (a variant stores only the tensors not
already in ``model.onnx.data`` in ``model.<variant>.onnx.data`` and points into the base file for
the rest — re-exporting the base invalidates variants written before), and the base values of the
live inputs in backend layout, keyed by input name, in ``onnx_live_weights.safetensors``
(numpy-readable; a variant reuses it when its live set is the same).
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import onnx
import torch
from safetensors.numpy import load_file, save

from edgeadapt.errors import ConfigError, ExportError
from edgeadapt.export import onnx_branch as br
from edgeadapt.export import onnx_graph as og
from edgeadapt.export import onnx_quant as oq
from edgeadapt.export.onnx_check import BoundSession, session
from edgeadapt.format.container import atomic_write_bytes
from edgeadapt.graphs import blocked as ob
from edgeadapt.models import LoadedModel, LogitsModule, example_inputs
from edgeadapt.numeric import rel_error

LIVE_FILE = "onnx_live_weights.safetensors"
RTOL = 1e-4
#: (batch, seq, seed) of the parity cases run at export; they differ from the traced shape
#: (2, 8) so the dynamic batch and sequence dimensions are exercised.
CHECK_CASES = ((2, 8, 1), (1, 5, 2), (3, 13, 3))
_EDIT_DENSITY = 0.01


def export_onnx(lm: LoadedModel, out_dir: Path, live_weights: list[str],
                branch: tuple | None = None, *, branch_targets: list[str] | None = None,
                check: bool = True, threads: int = 1, blocked: bool = True,
                precision: str = "fp32") -> dict:
    """Export ``lm`` to ONNX with ``live_weights`` as graph inputs; optionally with an unfused
    adapter branch. Returns the bundle sections (see module docstring for files and layouts)::

        {"section": {"file", "data": [data files], "inputs": [{name, dtype, shape}],
                     "outputs": ["logits"], "live_weights_file", "branch": {...} | None,
                     "branch_inputs": {weight: {param: input name}},
                     "branch_input_specs": [{name, dtype, shape}], "opset", "ir_version",
                     "parity": {...}},
         "weights": {weight: {"name": input name,
                              "layout": "as-is" | "transposed" | "blocked32",
                              "shape": backend shape}}}

    live_weights: torch parameter names (``...q_proj.weight``, layout (out, in)) of the weights
        that become graph inputs; all other weights stay constant initializers.
    branch: None | ("lora", r) | ("sira", E, r, top_k, capacity_factor): add an unfused branch on
        every ``branch_targets`` Linear (default: the live weights' Linears), its parameters
        extra graph inputs with all-zero defaults (LoRA: rank 0), so the graph also runs without
        them and ONNX Runtime's LoRA adapter API (``RunOptions.add_active_adapter``, which
        feeds adapter tensors by input name through ``InferenceSession.run``, not
        ``run_with_iobinding``) can drive it.
    blocked: re-lay the live weights read only by MatMul as ``blocked32``
        (:func:`edgeadapt.graphs.blocked.block_live_matmuls`; MLAS reads a graph-input weight
        unpacked, and one token through ``(in, out)`` costs 1.6x the packed time, through
        32-wide blocks 0.85x). False keeps them ``transposed``.
    precision: ``fp32``, or ``int8`` / ``int4``: the weights of
        :func:`edgeadapt.models.targets.quantized_weight_names` on that grid, the rest by ONNX
        Runtime's own quantized kernels and the live ones as codes + scales inputs
        (:mod:`edgeadapt.export.onnx_quant`); the entries of quantized live weights carry
        ``"quant": {"grid", "scales", "scales_shape"}`` and the parity check compares with
        the PyTorch model carrying the dequantized weights (``onnx_quant.QUANT_RTOL``: the
        graph's MatMulNBits run with float activations, ``onnx_quant.float_activations``),
        its in-place edit made on the codes. A branch variant gets the base graph's quantized
        rest and codes + scales inputs; its branches stay float32 inputs (``y = x Wq^T + b +
        x A^T B^T``), compared with the branch layers around the dequantized weights.
    check: run the saved graph on ONNX Runtime (CPU, prepacking on, live inputs bound to their
        base values, random branch inputs) at several shapes, then again after a 1% random edit
        of every live buffer made in place, and compare with PyTorch carrying the same values:
        max |ort - torch| / max |torch| must be <= 1e-4, else ExportError.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = br.parse_branch(branch)
    variant = br.variant_name(info)
    file_name = "model.onnx" if variant is None else f"model.{variant}.onnx"
    model = lm.model
    params = dict(model.named_parameters())
    _check_weight_names(params, live_weights, "live weight")
    targets = list(live_weights) if branch_targets is None else list(branch_targets)
    if info is not None:
        _check_weight_names(params, targets, "branch target")
        if not targets:
            raise ConfigError("a branch variant needs at least one branch target")
    data_names = ["input_ids"] + (["attention_mask"] if lm.kind == "classifier" else [])

    quant = oq.QuantPlan.of(lm, live_weights, precision)  # before the branch layers go in
    with br.branched(model, [t[: -len(".weight")] for t in targets], info) as (
            param_names, branch_inputs), torch.no_grad():
        wrapper = br.BranchInputs(LogitsModule(lm).eval(), len(data_names), param_names).eval()
        proto = _trace(lm, wrapper, data_names, param_names, info)
        weights_np = {w: params[w].detach().cpu().numpy().astype(np.float32, copy=True)
                      for w in live_weights}
        refs = None
        if check:
            with oq.dequantized(model, quant):
                refs = _torch_references(lm, wrapper, param_names,
                                         quant.live_values(weights_np) if quant else weights_np,
                                         quant.steps() if quant else None)
        default_shapes = (br.default_branch_values(model, param_names, info)
                          if info is not None else {})

    if quant is not None:  # an affine grid's offsets become float terms
        weights_np = quant.split_offsets(proto, weights_np)
    located = og.locate_live_weights(proto, weights_np)
    live = og.make_live_inputs(proto, located)
    if blocked or quant is not None:
        live = ob.block_live_matmuls(proto, live)
    entries = {w: {"name": lw.name, "layout": lw.layout, "shape": list(lw.shape)}
               for w, lw in live.items()}
    base_values = {lw.name: og.to_backend_layout(weights_np[w], lw.layout)
                   for w, lw in live.items()}
    if quant is not None:
        proto, entries, base_values = quant.apply(proto, live, entries, base_values)
    # after quant.apply: the quantizer must see the branches as inputs, never as constants
    og.add_default_initializers(proto, {n: np.zeros(s, np.float32)
                                        for n, s in default_shapes.items()})
    og.cap_ir_version(proto)
    data_files = og.save_with_external_data(
        proto, out_dir, file_name, reuse_from="model.onnx" if variant is not None else None)
    live_file = _write_live_file(out_dir, base_values, variant)

    parity = None
    if refs is not None:
        with oq.float_activations(out_dir / file_name) if quant else \
                nullcontext(out_dir / file_name) as checked:
            parity = _check_parity(checked, base_values, entries, weights_np, refs, threads,
                                   oq.QUANT_RTOL if quant else RTOL)
    return {
        "section": {
            "file": file_name,
            "data": data_files,
            "inputs": og.input_specs(proto, data_names),
            "outputs": ["logits"],
            "live_weights_file": live_file,
            "branch": info,
            "branch_inputs": branch_inputs,
            "branch_input_specs": og.input_specs(proto, param_names),
            "opset": next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
            "ir_version": int(proto.ir_version),
            "parity": parity,
            "precision": precision,
        },
        "weights": entries,
    }


def _check_weight_names(params: dict[str, torch.Tensor], names: list[str], what: str) -> None:
    for name in names:
        if name not in params:
            raise ConfigError(f"{what} {name!r} is not a parameter of the model")
        if params[name].dim() != 2 or not name.endswith(".weight"):
            raise ConfigError(f"{what} {name!r} is not a 2-D Linear weight")
    if len(set(names)) != len(names):
        raise ConfigError(f"duplicate {what} names")


def _trace(lm: LoadedModel, wrapper: br.BranchInputs, data_names: list[str],
           param_names: list[str], info: dict | None) -> onnx.ModelProto:
    """torch.export + ONNX translation with dynamic batch / seq (and LoRA rank) dimensions."""
    ex = example_inputs(lm, batch=2, seq=8, seed=0)
    tensors = br.example_branch_tensors(lm.model, param_names) if info is not None else []
    batch, seq = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("seq", min=1)
    dyn = [{0: batch, 1: seq} for _ in data_names]
    dyn += br.branch_dynamic_dims(info, param_names) if info is not None else []
    try:
        prog = torch.onnx.export(
            wrapper, tuple(ex[n] for n in data_names) + tuple(tensors),
            dynamic_shapes=(tuple(dyn),), input_names=data_names + param_names,
            output_names=["logits"], dynamo=True, optimize=True, verbose=False)
    except Exception as exc:  # the exporter raises many unrelated types
        raise ExportError(f"torch.onnx.export failed for {lm.name}: {exc}") from exc
    return prog.model_proto


def _case_inputs(lm: LoadedModel, batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    inputs = example_inputs(lm, batch=batch, seq=seq, seed=seed)
    if "attention_mask" in inputs and seq > 3:
        inputs["attention_mask"][0, -3:] = 0  # a padded row
    return inputs


def _torch_references(lm: LoadedModel, wrapper: br.BranchInputs, param_names: list[str],
                      weights_np: dict[str, np.ndarray],
                      steps: dict[str, tuple] | None = None) -> dict:
    """PyTorch outputs for each check case, and for the last case again with a random 1% delta
    added to every live weight (restored bit for bit afterwards): ``edits[w] = (idx, delta,
    buffer change)``. ``steps``: per quantized live weight (codes and per-entry scales, both
    (out, in), qmin, qmax): its delta moves the codes by 3 or 4 int4 steps (48 or 64 int8
    steps: the same size in the weight; clipped to the range), and
    the buffer change is the code change."""
    cases = []
    for i, (b, s, seed) in enumerate(CHECK_CASES):
        inputs = _case_inputs(lm, b, s, seed)
        tensors = br.example_branch_tensors(lm.model, param_names, seed=100 + i)
        out = wrapper(*inputs.values(), *tensors).float().numpy()
        cases.append(({k: v.numpy() for k, v in inputs.items()},
                      {n: t.numpy() for n, t in zip(param_names, tensors, strict=True)}, out))
    rng = np.random.default_rng(7)
    edits = {}
    params = dict(lm.model.named_parameters())
    for w, arr in weights_np.items():
        k = max(1, int(_EDIT_DENSITY * arr.size))
        idx = np.sort(rng.choice(arr.size, size=k, replace=False)).astype(np.int64)
        delta = (rng.standard_normal(k) * (float(arr.std()) + 1e-3)).astype(np.float32)
        edits[w] = (idx, delta, delta)
        if steps and w in steps:
            codes, scale, lo, hi = steps[w]
            codes, scale = codes.reshape(-1)[idx], scale.reshape(-1)[idx]
            step = rng.choice([-4, -3, 3, 4], k) * ((hi + 1) // 8)  # int8: 16 x int4's steps
            moved = np.clip(codes.astype(np.int64) + step, lo, hi)
            delta = ((moved - codes) * scale).astype(np.float32)
            edits[w] = (idx, delta, (moved - codes).astype(np.int8))
    flat = {w: params[w].data.view(-1) for w in edits}
    try:
        for w, (idx, delta, _) in edits.items():
            t_idx = torch.from_numpy(idx)
            flat[w][t_idx] = torch.from_numpy(weights_np[w].reshape(-1)[idx] + delta)
        feeds, branch_vals, _ = cases[-1]
        edited = wrapper(*(torch.from_numpy(v) for v in feeds.values()),
                         *(torch.from_numpy(v) for v in branch_vals.values())).float().numpy()
    finally:
        for w, (idx, _, _) in edits.items():
            flat[w][torch.from_numpy(idx)] = torch.from_numpy(weights_np[w].reshape(-1)[idx])
    return {"cases": cases, "edits": edits, "edited": edited}


def _check_parity(path: Path, base_values: dict[str, np.ndarray], entries: dict[str, dict],
                  weights_np: dict[str, np.ndarray], refs: dict, threads: int,
                  rtol: float = RTOL) -> dict:
    """Run the saved graph and compare with the PyTorch references; raise ExportError.
    ``entries``: the live weights' bundle entries (input name, layout)."""
    bound = BoundSession(session(path, threads), {k: v.copy() for k, v in base_values.items()})
    errors = []
    for feeds, branch_vals, ref in refs["cases"]:
        errors.append(rel_error(bound.run({**feeds, **branch_vals}), ref))
    for w, (idx, _, change) in refs["edits"].items():  # edit the bound buffers in place
        name, layout = entries[w]["name"], entries[w]["layout"]
        b_idx = og.torch_flat_to_backend_flat(idx, weights_np[w].shape, layout)
        buf = bound.buffers[name].reshape(-1)
        buf[b_idx] = base_values[name].reshape(-1)[b_idx] + change
    edited_err = rel_error(bound.run(refs["cases"][-1][0]), refs["edited"])
    worst = max(errors + [edited_err])
    # how far the edit moved PyTorch's output: the check sees a missed edit only above rtol
    moved = rel_error(refs["edited"], refs["cases"][-1][2])
    result = {"max_rel_error": worst, "cases": [list(c[:2]) for c in CHECK_CASES],
              "edited_max_rel_error": edited_err, "edit_moved": moved, "rtol": rtol}
    if not moved > rtol:
        raise ExportError(f"{path.name}: the check's in-place edit moves the output by only "
                          f"{moved:.2g}, too little to tell at tolerance {rtol:g}")
    if not worst <= rtol:
        raise ExportError(
            f"{path.name}: ONNX Runtime output differs from PyTorch (max relative error "
            f"{worst:.3g} > {rtol:g}; per case {[f'{e:.2g}' for e in errors]}, after an in-place "
            f"edit of the live weights {edited_err:.2g})")
    return result


def _write_live_file(out_dir: Path, values: dict[str, np.ndarray], variant: str | None) -> str:
    """Write the live inputs' base values (safetensors, numpy); a variant whose live set equals
    the base file's reuses it. Returns the file name."""
    base = out_dir / LIVE_FILE
    if variant is not None and base.is_file():
        existing = load_file(str(base))
        if existing.keys() == values.keys() and all(
                np.array_equal(existing[k], v) for k, v in values.items()):
            return LIVE_FILE
    name = LIVE_FILE if variant is None else f"onnx_live_weights.{variant}.safetensors"
    blob = save({k: np.ascontiguousarray(v) for k, v in values.items()},
                metadata={"format": "edgeadapt-onnx-live-weights", "layout": "backend"})
    atomic_write_bytes(out_dir / name, [blob])
    return name
