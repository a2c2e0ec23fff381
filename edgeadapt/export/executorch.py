"""ExecuTorch (XNNPACK) export of a base model in the layout the in-place runtime needs.

(Over 400 lines because the live program, the constant program and the branch variants are one
lowering: the same wrapped graph, buffer naming and partitioning, so the three stay one graph.)

Two programs per variant:

- ``model[.<variant>].pte`` ("live"): each live weight (torch name, (out, in)) is a *mutable
  buffer*, shared between methods (``MemoryPlanningPass(share_mutable_buffers=True)``), kept with
  its initial values (``InitializedMutableBufferPass``) and named in the program
  (``emit_mutable_buffer_names=True``). A second method, ``touch``, mutates the buffers
  (``w.mul_(1)``); it is never run, it only makes the buffers memory-planned so that
  ``method.get_attribute(name)`` returns a tensor aliasing the planned memory the forward reads.
  The XNNPACK partition is selective (:mod:`edgeadapt.export.executorch_partition`): only the
  linears whose weight is a buffer read it at run time; every other weight stays constant and
  packed. In the default ``own-kernel`` live form the live linears are not XNNPACK's at all
  but edgeadapt's own kernel (:mod:`edgeadapt.export.executorch_live_form`).
- ``model.const.pte`` ("repack", base only): the same graph with every weight constant (what
  XNNPACK packs at load). For each live weight the byte offset of its fp32 data in the file and
  its layout are recorded, found by value; the repack runtime rewrites those bytes in a host copy
  of the file and reloads the program.

Quantized bundles (``precision="int8"|"int4"``, :mod:`edgeadapt.export.executorch_quant`):
the live program only, the rest on XNNPACK's quantized linears (torchao), the quantized live
weights int8 codes + scales buffers read by ``edgeadapt::live_qlinear.out`` (int4 codes packed
two per byte, read by ``edgeadapt::live_q4linear.out``).

Shapes: one ``forward(input_ids[, attention_mask])`` with dynamic ``batch`` in [1, max_batch]
and ``seq`` in [1, max_seq] (upper bounds memory-plan the activations).

Branch variants add unfused branches around every live weight, built from the adapters
package's own layers (never a second implementation), with every branch tensor a mutable buffer
initialised to zeros (so the loaded program is the base model):

- ``("lora", r)``: :class:`~edgeadapt.adapters.LoraLinear` with alpha = r (scaling 1):
  ``y = x W^T + b + (x A^T) B^T``; A (r, in), B (out, r). The runtime zero-pads smaller ranks.
- ``("sira", E, r, top_k, capacity_factor)``: :class:`~edgeadapt.adapters.SiraLinear` with
  alpha = r: router (E, in), A (E, r, in), B (E, out, r); top_k and capacity_factor static.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeadapt.errors import ConfigError, ExportError
from edgeadapt.export.executorch_live_form import LIVE_FORMS
from edgeadapt.format.container import atomic_write_bytes
from edgeadapt.models import LoadedModel, LogitsModule

log = logging.getLogger(__name__)
# Prefix LogitsModule puts in front of every torch name of the model.
PREFIX = "model."
TOUCH_METHOD = "touch"
#: the form of the base program's live linears (edgeadapt.export.executorch_live_form); where
#: no C++ compiler can build edgeadapt's kernel, :data:`FALLBACK_LIVE_FORM` (logged, recorded)
DEFAULT_LIVE_FORM = "own-kernel"
FALLBACK_LIVE_FORM = "weight-left"


# ---------------------------------------------------------------------------------------------
# Variants and files
# ---------------------------------------------------------------------------------------------


def variant_name(branch: tuple | None) -> str | None:
    """``None`` (base) | ``"lora-r8"`` | ``"sira-e4-r4-k2-cf1.5"``. Raises ConfigError."""
    if branch is None:
        return None
    kind = branch[0] if branch else None
    if kind == "lora" and len(branch) == 2 and _posint(branch[1]):
        return f"lora-r{branch[1]}"
    if kind == "sira" and len(branch) == 5 and all(_posint(v) for v in branch[1:4]):
        E, r, k, cf = branch[1:]
        if k > E or not (isinstance(cf, (int, float)) and cf > 0 and math.isfinite(cf)):
            raise ConfigError(f"sira branch {branch!r}: need top_k <= E and capacity_factor > 0")
        return f"sira-e{E}-r{r}-k{k}-cf{float(cf):g}"
    raise ConfigError(f"branch {branch!r}: expected None, ('lora', r) or "
                      "('sira', E, r, top_k, capacity_factor)")


def _posint(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def pte_file_names(branch: tuple | None) -> tuple[str, str]:
    """(live program, constant-weight program) file names of a variant."""
    v = variant_name(branch)
    stem = "model" if v is None else f"model.{v}"
    return f"{stem}.pte", f"{stem}.const.pte"


# ---------------------------------------------------------------------------------------------
# Building the module to export
# ---------------------------------------------------------------------------------------------


def _to_buffer(module: nn.Module, attr: str, zero: bool = False) -> None:
    """Turn parameter ``module.<attr>`` into a buffer of the same name (a copy)."""
    value = getattr(module, attr).detach().clone()
    if zero:
        value.zero_()
    del module._parameters[attr]
    module.register_buffer(attr, value)


def _branch_layer(linear: nn.Linear, branch: tuple) -> nn.Module:
    from edgeadapt.adapters import LoraLinear, SiraLinear

    if branch[0] == "lora":
        r = branch[1]
        return LoraLinear(linear, r=r, alpha=float(r)).eval()
    E, r, top_k, cf = branch[1:]
    return SiraLinear(linear, E, r, alpha=float(r), top_k=top_k,
                      capacity_factor=float(cf)).eval()


def branch_param_names(branch: tuple | None) -> tuple[str, ...]:
    """Names of the branch tensors inside each adapted layer."""
    if branch is None:
        return ()
    return ("lora_A", "lora_B") if branch[0] == "lora" else ("sira_router", "sira_A", "sira_B")


def build_live_model(lm: LoadedModel, live_weights: list[str], branch: tuple | None,
                     form: str = "linear") -> LoadedModel:
    """A deep copy of ``lm`` whose live weights (and branch tensors, zeroed) are buffers; without
    a branch, the live linears are written in ``form``
    (:mod:`edgeadapt.export.executorch_live_form`)."""
    from edgeadapt.adapters.base import replace_module
    from edgeadapt.export.executorch_live_form import apply_live_form

    model = copy.deepcopy(lm.model)
    modules = [w.removesuffix(".weight") for w in live_weights]
    if branch is None:
        apply_live_form(model, modules, form)
    for mname in modules:
        linear = model.get_submodule(mname)
        if branch is not None:
            layer = _branch_layer(linear, branch)
            replace_module(model, mname, layer)
            for p in branch_param_names(branch):
                _to_buffer(layer, p, zero=True)
            linear = layer
        _to_buffer(linear, "weight")
    return dataclasses.replace(lm, model=model)


def check_live_weights(lm: LoadedModel, live_weights: list[str]) -> None:
    """Every live weight must be the (out, in) weight of an nn.Linear of the model."""
    if not live_weights:
        raise ConfigError("live_weights is empty: nothing would be editable")
    for wname in live_weights:
        mname, _, leaf = wname.rpartition(".")
        try:
            module = lm.model.get_submodule(mname)
        except AttributeError:
            raise ConfigError(f"live weight {wname!r} is not in model {lm.name!r}") from None
        if leaf != "weight" or not isinstance(module, nn.Linear):
            raise ConfigError(f"live weight {wname!r} is not the weight of an nn.Linear")


class _Touch(nn.Module):
    """Mutates every live buffer (``w.mul_(1)``) so the buffers get memory-planned."""

    def __init__(self, wrapper: nn.Module, buffers: list[str]):
        super().__init__()
        self.model = wrapper.model
        self.names = [b.removeprefix(PREFIX) for b in buffers]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.names:
            buf = self.model.get_buffer(name)
            buf.mul_(1.0 if buf.is_floating_point() else 1)  # int8 codes stay int8
        return x + 1.0


def _input_names(lm: LoadedModel) -> list[str]:
    return ["input_ids", "attention_mask"] if lm.kind == "classifier" else ["input_ids"]


def _example(lm: LoadedModel, batch: int, seq: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    from edgeadapt.models import example_inputs

    ex = example_inputs(lm, batch=batch, seq=seq, seed=seed)
    return tuple(ex[n] for n in _input_names(lm))


def static_shapes(max_batch: int, max_seq: int) -> list[tuple[int, int]]:
    """The default (batch, seq) shapes a static-shape variant (SiRA) gets one method each for:
    1x1, 1 x max_seq, max_batch x max_seq."""
    return sorted({(1, 1), (1, max_seq), (max_batch, max_seq)})


def check_static_shapes(shapes: Any, max_batch: int, max_seq: int) -> list[tuple[int, int]]:
    """Validate the (batch, seq) shapes asked of a static-shape variant: a non-empty collection
    of int pairs with 1 <= batch <= max_batch and 1 <= seq <= max_seq. Returns them sorted
    without duplicates; ConfigError otherwise."""
    try:
        pairs = {(b, s) for b, s in shapes}
    except (TypeError, ValueError):
        raise ConfigError(f"static shapes {shapes!r}: expected (batch, seq) pairs") from None
    bad = [(b, s) for b, s in pairs
           if not (_posint(b) and _posint(s) and b <= max_batch and s <= max_seq)]
    if bad or not pairs:
        raise ConfigError(f"static shapes {bad or sorted(pairs)}: need at least "
                          f"one (batch, seq) with 1 <= batch <= {max_batch} and "
                          f"1 <= seq <= {max_seq}")
    return sorted(pairs)


def static_method(batch: int, seq: int) -> str:
    return f"forward_{batch}x{seq}"


def _export_static(lm: LoadedModel, shapes: list[tuple[int, int]]):
    wrapper = LogitsModule(lm)
    eps = {}
    for b, s in shapes:
        try:
            eps[static_method(b, s)] = torch.export.export(wrapper, _example(lm, b, s),
                                                           strict=False)
        except Exception as exc:  # torch raises many kinds; report them as one
            raise ExportError(f"torch.export of {lm.name} at {b}x{s} failed: {exc}") from exc
    return wrapper, eps


def _export_forward(lm: LoadedModel, max_batch: int, max_seq: int):
    wrapper = LogitsModule(lm)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    seq = torch.export.Dim("seq", min=1, max=max_seq)
    names = _input_names(lm)
    example = _example(lm, 2, min(8, max_seq))
    try:
        ep = torch.export.export(wrapper, example, strict=False,
                                 dynamic_shapes=tuple({0: batch, 1: seq} for _ in names))
    except Exception as exc:  # torch raises many kinds; report them as one
        raise ExportError(f"torch.export of {lm.name} failed: {exc}") from exc
    return wrapper, ep


# ---------------------------------------------------------------------------------------------
# Lowering
# ---------------------------------------------------------------------------------------------


PARTITIONS = ("selective", "all-constant")


GEMM_OPS = ("aten.mm.", "aten.addmm.", "aten.linear.", "aten.bmm.")


def undelegated_gemms(edge: Any) -> int:
    """GEMMs left outside every XNNPACK delegate, over the program's methods but ``touch``: they
    run on the runtime's reference kernels (4-5x slower, docs/bench.md)."""
    return sum(1 for m in edge.methods if m != TOUCH_METHOD
               for n in edge.exported_program(m).graph.nodes
               if n.op == "call_function" and any(g in str(n.target) for g in GEMM_OPS))


def _lower_live(lm: LoadedModel, buffers: list[str], max_batch: int, max_seq: int,
                partition: str, shapes: list[tuple[int, int]] | None,
                extra: dict[str, Any] | None = None) -> tuple[bytes, int, Any]:
    """Lower the live program: forward (or the static methods), touch and the ``extra``
    exported programs (the decoder), all sharing the mutable buffers. Returns (its bytes, the
    GEMMs left undelegated, the ExecuTorch program)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.init_mutable_pass import InitializedMutableBufferPass

    from edgeadapt.export.executorch_partition import selective_partitioner

    if shapes is None:
        wrapper, ep = _export_forward(lm, max_batch, max_seq)
        methods = {"forward": ep}
    else:
        wrapper, methods = _export_static(lm, shapes)
    methods[TOUCH_METHOD] = torch.export.export(_Touch(wrapper, buffers), (torch.zeros(1),),
                                                strict=False)
    methods.update(extra or {})
    wanted = set(buffers)
    placeholders = sorted(
        {ph for e in methods.values() for ph, b in e.graph_signature.inputs_to_buffers.items()
         if b in wanted})
    edge = to_edge_transform_and_lower(methods,
                                       partitioner=[selective_partitioner()
                                                    if partition == "selective"
                                                    else XnnpackPartitioner()])
    outside = undelegated_gemms(edge)
    prog = edge.to_executorch(ExecutorchBackendConfig(
        passes=[InitializedMutableBufferPass(placeholders)],
        memory_planning_pass=MemoryPlanningPass(share_mutable_buffers=True),
        emit_mutable_buffer_names=True,
        # a decoder's cache write (index_put on a buffer) in place, not a copy of the cache
        run_reinplace_pass=bool(extra),
    ))
    return bytes(prog.buffer), outside, prog


def lower_const(lm: LoadedModel, max_batch: int, max_seq: int) -> tuple[bytes, int]:
    """``lm``'s forward with every weight constant, lowered whole by the stock XNNPACK
    partitioner (what XNNPACK packs at load): its bytes and the GEMMs left undelegated."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    _, ep = _export_forward(lm, max_batch, max_seq)
    edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
    return bytes(edge.to_executorch().buffer), undelegated_gemms(edge)


def locate_weight(blob: bytes, weight: np.ndarray) -> dict[str, Any]:
    """Byte offset and layout of ``weight`` (out, in) fp32 inside ``blob``, found by value.

    Tries the torch layout, then the transpose. Raises ExportError unless exactly one match.
    """
    w = np.ascontiguousarray(weight, dtype=np.float32)
    for layout, arr in (("as-is", w), ("transposed", np.ascontiguousarray(w.T))):
        data = arr.tobytes()
        at = blob.find(data)
        if at >= 0:
            if blob.find(data, at + 1) >= 0:
                raise ExportError("weight bytes occur twice in the constant program: the "
                                  "repack offset would be ambiguous")
            return {"offset": at, "layout": layout}
    raise ExportError("weight bytes not found in the constant program (packed or converted at "
                      "export?): repack mode cannot rewrite it")


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------


def default_live_form() -> str:
    """:data:`DEFAULT_LIVE_FORM`, or :data:`FALLBACK_LIVE_FORM` (with a warning) where the
    kernel it needs cannot be built (no C++ compiler)."""
    from edgeadapt.runtime.backends.executorch.kernel import compiler

    try:
        compiler()
    except ConfigError as exc:
        log.warning("ExecuTorch live form %s instead of %s: %s", FALLBACK_LIVE_FORM,
                    DEFAULT_LIVE_FORM, exc)
        return FALLBACK_LIVE_FORM
    return DEFAULT_LIVE_FORM


def export_pte(lm: LoadedModel, out_dir: Path, live_weights: list[str],
               branch: tuple | None = None, *, max_batch: int = 8, max_seq: int = 64,
               repack: bool = True, verify: bool = True, partition: str = "selective",
               static: list[tuple[int, int]] | None = None,
               live_form: str | None = None, decoder_context: int | None = None,
               precision: str = "fp32") -> dict:
    """Export ``lm`` to ExecuTorch with ``live_weights`` editable in place; see the module doc.

    Writes ``model[.<variant>].pte`` (and, for the base, ``model.const.pte`` when ``repack``:
    branch variants are the unfused mode and always live) into ``out_dir``;
    when ``verify``, runs them with ``executorch.runtime`` and compares with PyTorch (max
    relative error <= 1e-4, after random edits written through ``get_attribute`` too), else
    raises ExportError. ``partition="all-constant"`` lowers with the stock XNNPACK partitioner,
    which (in the ``linear`` form) packs even the buffers at load so edits are silently ignored:
    it exists to show that the verification catches stale weights (it then raises ExportError),
    not for deployment.
    ``static``: for a SiRA variant, the (batch, seq) shapes to lower one method each for
    (default :func:`static_shapes`: 1x1, 1 x max_seq, max_batch x max_seq); each method is a
    full lowering, so a caller that runs one shape saves the others' time. ConfigError for a
    dynamic-shape program (base, LoRA), which runs every shape up to the maxima.
    ``live_form``: how the base program's live linears are written
    (:mod:`edgeadapt.export.executorch_live_form`; branch variants keep ``linear``). None:
    :data:`DEFAULT_LIVE_FORM` (``own-kernel``), or ``weight-left`` where no C++ compiler can
    build the kernel (logged); ``section["live_form"]`` records the form used.
    ``decoder_context``: causal LMs, base program: also lower the KV-cache decoder as the
    program's ``decode`` method, its cache ``decoder_context`` positions, its attention
    edgeadapt's kernel where ``live_form`` is ``own-kernel``, else standard ops
    (:mod:`edgeadapt.export.executorch_decoder`); ``result["decoder"]`` is its bundle.json
    entry (checked and completed by :func:`edgeadapt.export.executorch_decoder.check_decoder`).
    ``precision``: ``fp32`` | ``int8`` | ``int4`` (:mod:`edgeadapt.export.executorch_quant`:
    the rest on XNNPACK's quantized linears through torchao, the quantized live weights as
    codes + scales buffers read by ``edgeadapt::live_qlinear.out``; no constant program, no
    variants yet); each such weight's entry gains ``"quant": {"grid", "scales":
    buffer, "scales_shape", "codes_sha256", "packed"}`` (``packed``: int4 codes held two per
    byte, :mod:`edgeadapt.format.nibbles`) and the section ``"precision"``.
    Returns::

        {"section": {"file", "methods", "inputs", "max_batch", "max_seq", "branch", "live_form",
                     "undelegated_gemms",
                     "branch_buffers": {weight: {param: buffer}},
                     "repack": {"file", "weights": {weight: {"offset", "layout"}}} | None},
         "weights": {weight: {"buffer": name, "shape": [out, in]}},
         "verify": {"base", "edited", ...: worst relative error}}      # when verify
    """
    check_live_weights(lm, live_weights)
    if max_batch < 2 or max_seq < 2:
        raise ConfigError(f"max_batch ({max_batch}) and max_seq ({max_seq}) must be >= 2")
    variant_name(branch)
    if partition not in PARTITIONS:
        raise ConfigError(f"partition {partition!r} not in {PARTITIONS}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    live_file, const_file = pte_file_names(branch)
    params = branch_param_names(branch)

    # SiRA's capacity ceil(cf * k * T / E) becomes a float sym op on a dynamic token count,
    # which ExecuTorch cannot run: SiRA variants get one static method per shape instead.
    is_static = branch is not None and branch[0] == "sira"
    if static is not None and not is_static:
        raise ConfigError("static shapes are for SiRA variants only: this program has a "
                          "dynamic-shape forward")
    shapes = None if not is_static else check_static_shapes(
        static_shapes(max_batch, max_seq) if static is None else static, max_batch, max_seq)
    quant: dict[str, dict] = {}
    if precision != "fp32":
        from edgeadapt.export.executorch_quant import check_options

        check_options(precision, branch, live_form)
        live_form, repack = "own-kernel", False  # a quantized bundle runs live only
    if live_form is None:
        live_form = default_live_form() if branch is None else "linear"
    if live_form not in LIVE_FORMS:
        raise ConfigError(f"live_form {live_form!r} not in {LIVE_FORMS}")
    if decoder_context is not None and (branch is not None or lm.kind != "causal-lm"):
        raise ConfigError("a decoder is lowered into the base program of a causal LM only")
    if precision != "fp32":
        from edgeadapt.export.executorch_quant import quantized_live_model

        live_lm, quant = quantized_live_model(lm, list(live_weights), precision)
    else:
        live_lm = build_live_model(lm, list(live_weights), branch, live_form)
    extra, decoder = {}, None
    if decoder_context is not None:
        from edgeadapt.export.executorch_decoder import decode_program

        decode_ep, decoder = decode_program(  # the attention kernel lives beside live_linear
            live_lm, decoder_context, "kernel" if live_form == "own-kernel" else "bmm")
        extra[decoder["method"]] = decode_ep
    weight_buffers = {w: PREFIX + w for w in live_weights}
    branch_buffers = {w: {p: PREFIX + w.removesuffix("weight") + p for p in params}
                      for w in live_weights} if branch is not None else {}
    all_buffers = list(weight_buffers.values()) + [
        b for d in branch_buffers.values() for b in d.values()] + [
        PREFIX + q["scales"] for q in quant.values()]
    with torch.no_grad():
        blob, outside, program = _lower_live(live_lm, all_buffers, max_batch, max_seq,
                                             partition, shapes, extra)
    if decoder is not None:
        from edgeadapt.export.executorch_decoder import check_in_place

        check_in_place(program, decoder["attention"])
    atomic_write_bytes(out_dir / live_file, [blob])

    repack_info = None
    if repack and branch is None:
        with torch.no_grad():
            const_blob, _ = lower_const(lm, max_batch, max_seq)
        repack_info = {"file": const_file, "weights": {
            w: locate_weight(const_blob, lm.model.get_parameter(w).detach().numpy())
            for w in live_weights}}
        atomic_write_bytes(out_dir / const_file, [const_blob])

    section = {
        "file": live_file,
        "methods": {"forward": "forward" if shapes is None else None, "touch": TOUCH_METHOD,
                    "static": {f"{b}x{s}": static_method(b, s) for b, s in shapes or []},
                    **({"decode": decoder["method"]} if decoder else {})},
        "inputs": [{"name": n, "dtype": "int64", "shape": ["batch", "seq"]}
                   for n in _input_names(lm)],
        "max_batch": max_batch, "max_seq": max_seq,
        "branch": None if branch is None else list(branch),
        "live_form": live_form if branch is None else "linear",
        "undelegated_gemms": outside,
        "branch_buffers": branch_buffers,
        "repack": repack_info,
        "precision": precision,
    }
    weights = {w: {"buffer": weight_buffers[w],
                   "shape": list(lm.model.get_parameter(w).shape),
                   **({"quant": {**quant[w], "scales": PREFIX + quant[w]["scales"]}}
                      if w in quant else {})} for w in live_weights}
    result = {"section": section, "weights": weights}
    if decoder is not None:
        result["decoder"] = decoder
    if verify:
        from edgeadapt.export.executorch_verify import verify_export

        result["verify"] = verify_export(live_lm, out_dir, result)
    return result
