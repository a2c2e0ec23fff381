"""The KV-cache decoder graph of a causal LM for ONNX Runtime, its ``--targets`` weights live.

One graph serves prefill and decode: it takes ``S`` new tokens and the keys and values of the
``P`` tokens before them, and returns the logits of the new tokens and the keys and values of
all ``P + S`` (``P`` = 0 is the prefill, ``S`` = 1 a decode step)::

    input_ids      int64   (batch, seq)
    past_key_<i>   float32 (batch, kv_heads, past, head_dim)     i = 0 .. layers - 1
    past_value_<i> float32 (batch, kv_heads, past, head_dim)
    -> logits          float32 (batch, seq, vocab)
       present_key_<i>   float32 (batch, kv_heads, past + seq, head_dim)
       present_value_<i> float32 (batch, kv_heads, past + seq, head_dim)

Positions are ``past .. past + seq - 1`` (the graph reads ``past`` from the cache's shape), the
attention causal over all ``past + seq`` positions; keys are stored after the rotary embedding.
The cache is plain tensors, concatenated (no fused attention op): the graph is standard ONNX
that any ONNX Runtime runs, and the projections are plain MatMuls, so the live weights are
located, moved to inputs and re-laid ``blocked32`` by the same code as the base graph
(:mod:`edgeadapt.export.onnx_graph`, :mod:`edgeadapt.graphs.blocked`) under the same input
names and layouts: the runtime binds one set of buffers to both graphs.

:class:`KVCacheDecoder` runs the Hugging Face model's own modules (embedding, norms,
projections, rotary embedding, MLP, head); only the cache and the attention mask are its own.
Llama-family models (``model_type`` ``llama``: SmolLM2, the tiny test model) only so far.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from edgeadapt.errors import ConfigError, ExportError
from edgeadapt.export import onnx_graph as og
from edgeadapt.export.onnx_check import session
from edgeadapt.graphs import blocked as ob
from edgeadapt.models import LoadedModel, LogitsModule, example_inputs
from edgeadapt.numeric import rel_error

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


class KVCacheDecoder(nn.Module):
    """``forward(input_ids, past_key_0, past_value_0, ...) -> (logits, present_key_0, ...)``
    over a Hugging Face Llama-family ``...ForCausalLM`` (shapes: module docstring).

    Per layer, with ``x`` the normed hidden states of the new tokens::

        q, k, v = rope(x Wq), rope(x Wk), x Wv          (rotary at positions past .. past+seq-1)
        K, V    = concat(past_key, k), concat(past_value, v)      -> present_key, present_value
        h      += softmax(q K^T / sqrt(head_dim) + causal mask) V Wo
        h      += mlp(norm(h))

    the same math as the model's own forward without a cache (the export checks the logits
    against it), with grouped key/value heads repeated as the model does.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        config = model.config
        if getattr(config, "model_type", None) not in SUPPORTED:
            raise ConfigError(f"--generate: model type {getattr(config, 'model_type', None)!r} "
                              f"has no KV-cache decoder yet (supported: {', '.join(SUPPORTED)})")
        self.model = model
        attn = model.model.layers[0].self_attn
        self.layers = int(config.num_hidden_layers)
        self.kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(attn.head_dim)
        self.groups = int(attn.num_key_value_groups)
        self.scaling = float(attn.scaling)

    def forward(self, input_ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

        base = self.model.model
        batch, seq = input_ids.shape
        past_len = past[0].shape[2]
        h = base.embed_tokens(input_ids)
        positions = (torch.arange(seq, device=h.device) + past_len).unsqueeze(0)
        cos, sin = base.rotary_emb(h, positions)
        keys = torch.arange(past_len + seq, device=h.device)
        mask = torch.zeros((seq, past_len + seq), dtype=h.dtype, device=h.device).masked_fill(
            keys[None, :] > positions[0][:, None], torch.finfo(h.dtype).min)
        presents = []
        for i, layer in enumerate(base.layers[: self.layers]):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k = torch.cat([past[2 * i], k], dim=2)
            v = torch.cat([past[2 * i + 1], v], dim=2)
            presents += [k, v]
            scores = torch.matmul(q, repeat_kv(k, self.groups).transpose(2, 3)) * self.scaling
            weights = torch.softmax(scores + mask, dim=-1, dtype=torch.float32).to(q.dtype)
            out = torch.matmul(weights, repeat_kv(v, self.groups)).transpose(1, 2)
            h = h + attn.o_proj(out.reshape(batch, seq, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return (self.model.lm_head(base.norm(h)), *presents)

    def empty_cache(self, batch: int, past: int = 0) -> list[torch.Tensor]:
        """Zeros of the cache inputs' shapes with ``past`` cached positions."""
        return [torch.zeros(batch, self.kv_heads, past, self.head_dim)
                for _ in range(2 * self.layers)]


def export_onnx_decoder(lm: LoadedModel, out_dir: Path, live_weights: list[str], *,
                        max_context: int, expected: dict[str, dict] | None = None,
                        check: bool = True, threads: int = 1, blocked: bool = True) -> dict:
    """Write ``out_dir/decoder.onnx`` (its tensors shared with ``model.onnx.data`` where
    byte-identical, the rest in ``decoder.onnx.data``) and return::

        {"section": {"file", "data", "layers", "kv_heads", "head_dim",
                     "inputs": {"ids": "input_ids", "past": [[key, value], ...]},
                     "outputs": {"logits": "logits", "present": [[key, value], ...]},
                     "weights": {weight: {"name", "layout", "shape"}}, "opset", "ir_version",
                     "parity": {...} | None},
         "weights": {weight: {"name", "layout", "shape"}}}

    live_weights: torch names of the live weights, graph inputs as in ``model.onnx``.
    expected: the base graph's entries per live weight (``export_onnx``'s ``"weights"``): the
        decoder's must have the same input names and layouts, since the runtime binds one
        buffer per weight to both graphs; ExportError otherwise.
    max_context: the most positions (prompt + generated) a conversation may hold: the bound
        of the traced dynamic dimensions (the runtime's limit is recorded by
        :func:`edgeadapt.export.decoder.export_generation`).
    check: compare the logits of a prefill, a multi-token step and single-token decode steps
        with the model's full forward at every position (max relative error <= 1e-4, else
        ExportError).
    """
    if isinstance(max_context, bool) or not isinstance(max_context, int) or max_context < 2:
        raise ConfigError(f"max_context {max_context!r}: a whole number >= 2")
    out_dir = Path(out_dir)
    wrapper = KVCacheDecoder(lm.model).eval()
    names = past_names(wrapper.layers)
    params = dict(lm.model.named_parameters())
    with torch.no_grad():
        proto = _trace(lm, wrapper, max_context)
        weights_np = {w: params[w].detach().cpu().numpy().astype(np.float32, copy=True)
                      for w in live_weights}
    live = og.make_live_inputs(proto, og.locate_live_weights(proto, weights_np))
    if blocked:
        live = ob.block_live_matmuls(proto, live)
    entries = {w: {"name": lw.name, "layout": lw.layout, "shape": list(lw.shape)}
               for w, lw in live.items()}
    for w, entry in (expected or {}).items():
        got = entries.get(w)
        if got is None or (got["name"], got["layout"]) != (entry["name"], entry["layout"]):
            raise ExportError(f"live weight {w!r}: the decoder graph reads it as {got}, the base "
                              f"graph as {entry}; the runtime could not share its buffer")
    og.cap_ir_version(proto)
    data = og.save_with_external_data(proto, out_dir, DECODER_FILE, reuse_from="model.onnx")
    section = {
        "file": DECODER_FILE, "data": data,
        "layers": wrapper.layers, "kv_heads": wrapper.kv_heads, "head_dim": wrapper.head_dim,
        "inputs": {"ids": "input_ids", "past": names},
        "outputs": {"logits": "logits", "present": present_names(wrapper.layers)},
        "weights": entries,
        "opset": next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
        "ir_version": int(proto.ir_version),
        "parity": None,
    }
    if check:
        base = {lw.name: og.to_backend_layout(weights_np[w], lw.layout) for w, lw in live.items()}
        section["parity"] = _check(out_dir / DECODER_FILE, lm, wrapper, base, threads)
    return {"section": section, "weights": entries}


def _trace(lm: LoadedModel, wrapper: KVCacheDecoder, max_context: int) -> onnx.ModelProto:
    """torch.export + ONNX translation, dynamic batch, seq and past (example: 2 x 3 new tokens
    after 5 cached ones, sizes that pin nothing)."""
    ids = example_inputs(lm, batch=2, seq=3, seed=0)["input_ids"]
    past = [torch.randn(t.shape, generator=torch.Generator().manual_seed(i))
            for i, t in enumerate(wrapper.empty_cache(2, past=5))]
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=1, max=max_context)
    past_len = torch.export.Dim("past", min=0, max=max_context)
    dyn = ({0: batch, 1: seq}, tuple({0: batch, 2: past_len} for _ in past))
    flat_past = [n for pair in past_names(wrapper.layers) for n in pair]
    flat_present = [n for pair in present_names(wrapper.layers) for n in pair]
    try:
        prog = torch.onnx.export(
            wrapper, (ids, *past), dynamic_shapes=dyn, input_names=["input_ids", *flat_past],
            output_names=["logits", *flat_present], dynamo=True, optimize=True, verbose=False)
    except Exception as exc:  # the exporter raises many unrelated types
        raise ExportError(f"torch.onnx.export of the KV-cache decoder failed for {lm.name}: "
                          f"{exc}") from exc
    return prog.model_proto


#: how the check walks a 12-token sequence: a prefill of 5, one step of 3, then 4 single steps
_CHECK_CHUNKS = (5, 3, 1, 1, 1, 1)


def _check(path: Path, lm: LoadedModel, wrapper: KVCacheDecoder, live: dict[str, np.ndarray],
           threads: int) -> dict:
    """Run the saved graph chunk by chunk over a batch of 2 sequences, feeding each step's
    presents back as the next step's past, and compare every position's logits with the full
    forward of the model (no cache)."""
    total = sum(_CHECK_CHUNKS)
    ids = example_inputs(lm, batch=2, seq=total, seed=11)["input_ids"]
    with torch.no_grad():
        want = LogitsModule(lm)(ids).float().numpy()
    sess = session(path, threads)
    names = [n for pair in past_names(wrapper.layers) for n in pair]
    cache = [t.numpy() for t in wrapper.empty_cache(2)]
    errors, start = [], 0
    for n in _CHECK_CHUNKS:
        outs = sess.run(None, {"input_ids": np.ascontiguousarray(ids[:, start:start + n]),
                               **dict(zip(names, cache, strict=True)), **live})
        errors.append(rel_error(outs[0], want[:, start:start + n]))
        cache, start = outs[1:], start + n
    worst = max(errors)
    if not worst <= RTOL:
        raise ExportError(f"{path.name}: the KV-cache decoder's logits differ from the model's "
                          f"full forward (max relative error {worst:.3g} > {RTOL:g}; per step "
                          f"{[f'{e:.2g}' for e in errors]})")
    return {"max_rel_error": worst, "chunks": list(_CHECK_CHUNKS), "rtol": RTOL}
