"""The KV-cache decoder graph of a causal LM for ONNX Runtime, its ``--targets`` weights live.

One graph serves prefill and decode: it takes ``S`` new tokens, the number ``P`` of positions
already cached, and per layer a key and a value cache buffer of ``C >= P + S`` positions, and
returns the logits of the new tokens and the buffers with the new keys and values written at
``P .. P + S - 1`` (``P`` = 0 is the prefill, ``S`` = 1 a decode step)::

    input_ids      int64   (batch, seq)
    past_length    int64   ()                                        P
    logits_to_keep int64   ()                                        k (0: every position)
    past_key_<i>   float32 (batch, kv_heads, cache, head_dim)     i = 0 .. layers - 1
    past_value_<i> float32 (batch, kv_heads, cache, head_dim)
    -> logits          float32 (batch, k or seq, vocab)
       present_key_<i>   float32 (batch, kv_heads, cache, head_dim)   the past, updated
       present_value_<i> float32 (batch, kv_heads, cache, head_dim)

Attention is ONNX Runtime's fused ``com.microsoft.GroupQueryAttention`` (rotary embedding
included, :mod:`edgeadapt.export.onnx_contrib`): bound to the *same* buffer as input and output,
a cache is written in place (``past_present_share_buffer``), so a decode step copies nothing
and attends in one kernel per layer. Keys are stored after the rotary embedding. Each residual
add and the RMS norm after it are one ``SkipSimplifiedLayerNormalization``
(:mod:`edgeadapt.graphs.skip_norm`). The head computes the last ``k`` positions' logits only
(a prefill samples from its last), the vocabulary in chunks so that a terminated run stops
within one chunk (:mod:`edgeadapt.graphs.head`). The
projections stay plain MatMuls, so the live weights are located, moved to inputs and re-laid
``blocked32`` by the same code as the base graph (:mod:`edgeadapt.export.onnx_graph`,
:mod:`edgeadapt.graphs.blocked`) under the same input names and layouts: the runtime binds one
set of buffers to both graphs.

:class:`KVCacheDecoder` runs the Hugging Face model's own modules (embedding, norms,
projections, MLP, head); only the attention with its cache (the operator above, its rotary
tables taken from the model's own rotary embedding) is its own.
Llama-family models (``model_type`` ``llama``: SmolLM2, the tiny test model) only so far.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from edgeadapt.errors import ConfigError, ExportError
from edgeadapt.export import onnx_branch as br
from edgeadapt.export import onnx_graph as og
from edgeadapt.export import onnx_quant as oq
from edgeadapt.export.decoder import parity_report, step_error
from edgeadapt.export.onnx_check import session
from edgeadapt.graphs import blocked as ob
from edgeadapt.graphs.head import keep_last_logits
from edgeadapt.graphs.skip_norm import fuse_skip_norms
from edgeadapt.models import LoadedModel, example_inputs
from edgeadapt.runtime.backends.onnxruntime.decoder import CACHE_FORM

DECODER_FILE = "decoder.onnx"
#: the model types whose decoder layers :class:`KVCacheDecoder` knows
SUPPORTED = ("llama",)
RTOL = 1e-4


def past_names(layers: int) -> list[list[str]]:
    """``[[past_key_i, past_value_i], ...]``: the cache inputs, one pair per layer."""
    return [[f"past_key_{i}", f"past_value_{i}"] for i in range(layers)]


def present_names(layers: int) -> list[list[str]]:
    """``[[present_key_i, present_value_i], ...]``: the cache outputs, one pair per layer."""
    return [[f"present_key_{i}", f"present_value_{i}"] for i in range(layers)]


def _rms_norm(norm: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """A ``LlamaRMSNorm`` as the fused operator (its weight and epsilon)."""
    return torch.ops.edgeadapt.rms_norm(h, norm.weight, float(norm.variance_epsilon))


class KVCacheDecoder(nn.Module):
    """``forward(input_ids, past_length, past_key_0, past_value_0, ...) -> (logits,
    present_key_0, ...)`` over a Hugging Face Llama-family ``...ForCausalLM`` (shapes: module
    docstring).

    Per layer, with ``x`` the normed hidden states of the new tokens::

        x = rms_norm(h)
        out, present_key, present_value = gqa(x Wq, x Wk, x Wv, past_key, past_value)
        h += out Wo
        h += mlp(rms_norm(h))

    (:mod:`edgeadapt.export.onnx_contrib`: ``rms_norm`` with each norm's own weight and
    epsilon, exported as one fused op; ``gqa`` with rotary at positions ``past_length ..``, its
    cos/sin tables the model's rotary embedding at positions ``0 .. max_context - 1``): the
    same math as the model's own forward without a cache (the export checks the logits
    against it).
    """

    def __init__(self, model: nn.Module, max_context: int) -> None:
        super().__init__()
        config = model.config
        if getattr(config, "model_type", None) not in SUPPORTED:
            raise ConfigError(f"--generate: model type {getattr(config, 'model_type', None)!r} "
                              f"has no KV-cache decoder yet (supported: {', '.join(SUPPORTED)})")
        import edgeadapt.export.onnx_contrib  # noqa: F401  (registers torch.ops.edgeadapt.*)

        self.model = model
        attn = model.model.layers[0].self_attn
        self.layers = int(config.num_hidden_layers)
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(attn.head_dim)
        self.scaling = float(attn.scaling)
        positions = torch.arange(max_context)[None, :]
        probe = torch.zeros(1, max_context, self.head_dim)
        with torch.no_grad():
            cos, sin = model.model.rotary_emb(probe, positions)  # (1, positions, head_dim)
        half = self.head_dim // 2
        if not (torch.equal(cos[..., :half], cos[..., half:])
                and torch.equal(sin[..., :half], sin[..., half:])):
            raise ConfigError("--generate: the model's rotary tables are not half-split "
                              "(rotate_half); GroupQueryAttention cannot apply them")
        self.register_buffer("cos_cache", cos[0, :, :half].float().contiguous())
        self.register_buffer("sin_cache", sin[0, :, :half].float().contiguous())

    def forward(self, input_ids: torch.Tensor, past_length: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        base = self.model.model
        batch, seq = input_ids.shape
        h = base.embed_tokens(input_ids)
        total = (past_length + seq).to(torch.int32)
        seqlens = (total - 1).reshape(1).expand(batch)
        presents = []
        for i, layer in enumerate(base.layers[: self.layers]):
            attn = layer.self_attn
            x = _rms_norm(layer.input_layernorm, h)
            out, key, value = torch.ops.edgeadapt.gqa(
                attn.q_proj(x), attn.k_proj(x), attn.v_proj(x), past[2 * i], past[2 * i + 1],
                seqlens, total, self.cos_cache, self.sin_cache, self.heads, self.kv_heads,
                self.scaling)
            presents += [key, value]
            h = h + attn.o_proj(out)
            h = h + layer.mlp(_rms_norm(layer.post_attention_layernorm, h))
        return (self.model.lm_head(_rms_norm(base.norm, h)), *presents)

    def empty_cache(self, batch: int, positions: int) -> list[torch.Tensor]:
        """Zero cache buffers of ``positions`` positions each."""
        return [torch.zeros(batch, self.kv_heads, positions, self.head_dim)
                for _ in range(2 * self.layers)]


def decoder_file(variant: str | None) -> str:
    """``decoder.onnx``, or ``decoder.<variant>.onnx`` for a branch variant's decoder."""
    return DECODER_FILE if variant is None else f"decoder.{variant}.onnx"


def export_onnx_decoder(lm: LoadedModel, out_dir: Path, live_weights: list[str], *,
                        max_context: int, expected: dict[str, dict] | None = None,
                        check: bool = True, threads: int = 1, blocked: bool = True,
                        branch: tuple | None = None, precision: str = "fp32") -> dict:
    """Write ``out_dir/decoder.onnx`` (``decoder.<variant>.onnx`` with a ``branch``; its tensors
    shared with ``model.onnx.data`` where byte-identical, the rest in its own ``.data`` file)
    and return::

        {"section": {"file", "data", "layers", "kv_heads", "head_dim", "head_chunks",
                     "inputs": {"ids": "input_ids", "past_length": "past_length",
                                "logits_to_keep": "logits_to_keep",
                                "past": [[key, value], ...]},
                     "outputs": {"logits": "logits", "present": [[key, value], ...]},
                     "weights": {weight: {"name", "layout", "shape"}}, "opset", "ir_version",
                     "parity": {...} | None,
                     "branch": {...}, "branch_inputs": {weight: {key: input name}}  # branch only},
         "weights": {weight: {"name", "layout", "shape"}}}

    live_weights: torch names of the live weights, graph inputs as in ``model.onnx``.
    expected: the entries per live weight of a graph sharing the runtime's buffers (the base
        graph's, ``export_onnx``'s ``"weights"``; for a variant the base decoder's): the
        decoder's must have the same input names and layouts, since the runtime binds one
        buffer per weight to both graphs; ExportError otherwise.
    max_context: the most positions (prompt + generated) a conversation may hold: the bound
        of the traced dynamic dimensions (the runtime's limit is recorded by
        :func:`edgeadapt.export.decoder.export_generation`).
    branch: None, or a branch variant's spec (:func:`edgeadapt.export.onnx_branch.
        parse_branch`): every live weight's Linear becomes the adapters package's branch layer
        (``y = W0 x + B (A x)``, or SiRA's routed experts), its parameters graph inputs under
        the names the forward variant ``model.<variant>.onnx`` gives them, with the same
        all-zero defaults, so the runtime binds one set of branch tensors to both graphs.
    precision: quantize as the base graph (:mod:`edgeadapt.export.onnx_quant`; the check then
        compares with the PyTorch model carrying the dequantized weights, tolerance
        ``onnx_quant.QUANT_RTOL``, the graph's MatMulNBits with float activations); a
        branch's parameters stay float32 inputs beside the codes.
    check: run the saved graph as the runtime does over a prefill, a multi-token step and
        single-token decode steps, and compare each position's logits (the first sequence:
        every position, ``logits_to_keep`` 0; the second: each step's last, 1, as the runtime's
        prefill asks) with the PyTorch model
        (carrying the branch, random branch tensors) run on the same steps with transformers'
        own KV cache (max relative error <= 1e-4, else ExportError).
    """
    if isinstance(max_context, bool) or not isinstance(max_context, int) or max_context < 2:
        raise ConfigError(f"max_context {max_context!r}: a whole number >= 2")
    out_dir = Path(out_dir)
    info = br.parse_branch(branch)
    quant = oq.QuantPlan.of(lm, live_weights, precision)  # before the branch layers go in
    file_name = decoder_file(br.variant_name(info))
    params = dict(lm.model.named_parameters())
    modules = [w.removesuffix(".weight") for w in live_weights]
    with br.branched(lm.model, modules, info) as (param_names, branch_inputs), \
            torch.no_grad():
        wrapper = KVCacheDecoder(lm.model, max_context).eval()
        traced = br.BranchInputs(wrapper, 2 + 2 * wrapper.layers, param_names).eval()
        proto = _trace(lm, traced, wrapper, max_context, param_names, info)
        fuse_skip_norms(proto)  # residual add + norm in one kernel, as genai's graphs
        weights_np = {w: params[w].detach().cpu().numpy().astype(np.float32, copy=True)
                      for w in live_weights}
        defaults = br.default_branch_values(lm.model, param_names, info) if info else {}
        tensors = br.example_branch_tensors(lm.model, param_names, seed=5)
        ids = _check_ids(lm)
        with oq.dequantized(lm.model, quant):
            want = _reference(lm, ids, dict(zip(param_names, tensors, strict=True))) \
                if check else None
    if quant is not None:  # an affine grid's offsets become float terms
        weights_np = quant.split_offsets(proto, weights_np)
    live = og.make_live_inputs(proto, og.locate_live_weights(proto, weights_np))
    if blocked or quant is not None:
        live = ob.block_live_matmuls(proto, live)
    entries = {w: {"name": lw.name, "layout": lw.layout, "shape": list(lw.shape)}
               for w, lw in live.items()}
    base = {lw.name: og.to_backend_layout(weights_np[w], lw.layout) for w, lw in live.items()}
    if quant is not None:
        proto, entries, base = quant.apply(proto, live, entries, base)
    for w, entry in (expected or {}).items():
        got = entries.get(w)
        if got is None or (got["name"], got["layout"]) != (entry["name"], entry["layout"]):
            raise ExportError(f"live weight {w!r}: the decoder graph reads it as {got}, the base "
                              f"graph as {entry}; the runtime could not share its buffer")
    head = keep_last_logits(proto)  # after quant.apply: the head's codes are split as they are
    # after quant.apply: the quantizer must see the branches as inputs, never as constants
    og.add_default_initializers(proto, {n: np.zeros(s, np.float32) for n, s in defaults.items()})
    og.cap_ir_version(proto)
    data = og.save_with_external_data(proto, out_dir, file_name, reuse_from="model.onnx")
    section = {
        "file": file_name, "data": data,
        "layers": wrapper.layers, "kv_heads": wrapper.kv_heads, "head_dim": wrapper.head_dim,
        "cache": CACHE_FORM,
        "inputs": {"ids": "input_ids", "past_length": "past_length",
                   "logits_to_keep": head["input"], "past": past_names(wrapper.layers)},
        "head_chunks": head["chunks"],
        "outputs": {"logits": "logits", "present": present_names(wrapper.layers)},
        "weights": entries,
        "opset": next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
        "ir_version": int(proto.ir_version),
        "parity": None,
        "precision": precision,
    }
    if info is not None:
        section.update(branch=info, branch_inputs=branch_inputs)
    if want is not None:
        feeds = {n: t.numpy() for n, t in zip(param_names, tensors, strict=True)}
        with oq.float_activations(out_dir / file_name) if quant else \
                nullcontext(out_dir / file_name) as checked:
            section["parity"] = _check(checked, wrapper, ids.numpy(), {**base, **feeds}, want,
                                       threads, oq.QUANT_RTOL if quant else RTOL)
    return {"section": section, "weights": entries}


def _trace(lm: LoadedModel, traced: br.BranchInputs, wrapper: KVCacheDecoder,
           max_context: int, param_names: list[str], info: dict | None) -> onnx.ModelProto:
    """torch.export + ONNX translation (the attention operator as GroupQueryAttention), dynamic
    batch, seq and cache length (example: 2 x 3 new tokens after 5 cached ones in buffers of
    11 positions, sizes that pin nothing), and the LoRA rank of a branch."""
    from edgeadapt.export.onnx_contrib import translation_table

    ids = example_inputs(lm, batch=2, seq=3, seed=0)["input_ids"]
    past = [torch.randn(t.shape, generator=torch.Generator().manual_seed(i))
            for i, t in enumerate(wrapper.empty_cache(2, 11))]
    tensors = br.example_branch_tensors(lm.model, param_names) if info is not None else []
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=1, max=max_context)
    cache = torch.export.Dim("cache", min=2, max=max_context)
    dyn = ({0: batch, 1: seq}, None, *({0: batch, 2: cache} for _ in past),
           *(br.branch_dynamic_dims(info, param_names) if info is not None else []))
    flat_past = [n for pair in past_names(wrapper.layers) for n in pair]
    flat_present = [n for pair in present_names(wrapper.layers) for n in pair]
    try:
        prog = torch.onnx.export(
            traced, (ids, torch.tensor(5), *past, *tensors), dynamic_shapes=(dyn,),
            input_names=["input_ids", "past_length", *flat_past, *param_names],
            output_names=["logits", *flat_present], custom_translation_table=translation_table(),
            dynamo=True, optimize=True, verbose=False)
    except Exception as exc:  # the exporter raises many unrelated types
        raise ExportError(f"torch.onnx.export of the KV-cache decoder failed for {lm.name}: "
                          f"{exc}") from exc
    return prog.model_proto


#: how the check walks a 12-token sequence: a prefill of 5, one step of 3, then 4 single steps
_CHECK_CHUNKS = (5, 3, 1, 1, 1, 1)


def _check_ids(lm: LoadedModel) -> torch.Tensor:
    """The 2 sequences of the check, (2, sum(_CHECK_CHUNKS))."""
    return example_inputs(lm, batch=2, seq=sum(_CHECK_CHUNKS), seed=11)["input_ids"]


def _reference(lm: LoadedModel, ids: torch.Tensor, branch: dict[str, torch.Tensor]
               ) -> np.ndarray:
    """The logits (rows, positions, vocab) of the model run on ``ids`` one row at a time,
    chunk by chunk with transformers' own KV cache, the parameters ``branch`` (names relative
    to the model) replaced: the calls the runtime makes. Equal to the full forward but for
    rounding, except that SiRA routes the tokens of one call together (its expert capacity
    counts them), as transformers' ``generate`` does."""
    rows = []
    for row in ids:
        cache, start, logits = None, 0, []
        for n in _CHECK_CHUNKS:
            out = torch.func.functional_call(
                lm.model, branch, (), {"input_ids": row[None, start:start + n],
                                       "cache": cache, "use_cache": True},
                strict=False)
            cache, start = out.cache, start + n
            logits.append(out.logits.float().numpy())
        rows.append(np.concatenate(logits, axis=1))
    return np.concatenate(rows)


def _check(path: Path, wrapper: KVCacheDecoder, ids: np.ndarray, inputs: dict[str, np.ndarray],
           want: np.ndarray, threads: int, rtol: float = RTOL) -> dict:
    """Run the saved graph chunk by chunk over the rows of ``ids`` as the runtime does
    (batch 1, one cache buffer per tensor bound as both past and present, written in place;
    ``inputs``: the live weights and branch tensors by input name) and compare the logits with
    ``want`` (:func:`_reference`): the first row's at every position (``logits_to_keep`` 0),
    the others' at each step's last position (``logits_to_keep`` 1)."""
    import onnxruntime as ort

    total = sum(_CHECK_CHUNKS)
    sess = session(path, threads)
    # OrtValues: bind_cpu_input does not find inputs that have a default (the branches)
    values = {name: ort.OrtValue.ortvalue_from_numpy(v) for name, v in inputs.items()}
    errors = []
    for row in range(ids.shape[0]):  # batch 1: the runtime's form (GroupQueryAttention takes
        cache = [ort.OrtValue.ortvalue_from_numpy(t.numpy())  # a multi-token step after a
                 for t in wrapper.empty_cache(1, total + 1)]  # past only at batch 1)
        start = 0
        for n in _CHECK_CHUNKS:
            b = sess.io_binding()
            b.bind_cpu_input("input_ids", np.ascontiguousarray(ids[row:row + 1, start:start + n]))
            b.bind_cpu_input("past_length", np.array(start, np.int64))
            keep = 0 if row == 0 else 1
            b.bind_cpu_input("logits_to_keep", np.array(keep, np.int64))
            for name, value in values.items():
                b.bind_ortvalue_input(name, value)
            b.bind_output("logits", "cpu")
            pairs = zip(past_names(wrapper.layers), present_names(wrapper.layers), strict=True)
            for i, (past, present) in enumerate(pairs):
                for j in range(2):
                    b.bind_ortvalue_input(past[j], cache[2 * i + j])
                    b.bind_ortvalue_output(present[j], cache[2 * i + j])
            sess.run_with_iobinding(b)
            errors.append(step_error(b.get_outputs()[0].numpy()[0], want[row], start, n, keep,
                                     path.name))
            start += n
    return parity_report(errors, _CHECK_CHUNKS, rtol, path.name)
