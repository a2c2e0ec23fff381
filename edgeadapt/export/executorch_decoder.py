"""The KV-cache decoder of a causal LM as a method of the ExecuTorch live program.

``decode`` is a third method of ``model.pte`` (beside ``forward`` and ``touch``), lowered in the
same call, so it reads the *same* mutable buffers as ``forward`` for the live weights
(``MemoryPlanningPass(share_mutable_buffers=True)`` gives every mutable buffer of every method
one place in one shared arena, by name): a switch written through ``forward``'s
``get_attribute`` views reaches the decoder with no copy and no extra cost. Its cache is more
mutable buffers of that arena, a static cache as in ExecuTorch's own LLM export::

    decode(input_ids int64 (1, seq), positions int64 (past + seq,), keep int64 (k,))
        -> logits (1, k, vocab)                                       the last k positions'
    k_cache_<i>, v_cache_<i>: float32 (1, kv_heads, max_context, head_dim)    i = 0 .. layers-1

``positions`` is ``0 .. past + seq - 1``: the new tokens take the last ``seq`` of them, and its
*length* is the attention's extent, a dynamic dimension of the program (``past + seq`` in
[1, max_context - 1], ``seq`` in [1, :func:`max_chunk`]), so a step attends over the positions
held, not over the whole buffer. (``max_context - 1``: a conversation's last token is sampled,
never fed back, and torch.export would specialise a slice as long as the whole buffer.)
``keep``'s length ``k`` in [1, seq] (its values unread) is likewise how many of the new
positions' logits the head computes: a prefill samples from its last position only, so the
runtime passes ``k = 1`` and the head skips ``(seq - 1) x hidden x vocab`` multiply-adds.
Per layer, with ``x`` the normed hidden states of the new tokens and ``n = past .. past + seq
- 1``::

    q, k, v = rope(x Wq, n), rope(x Wk, n), x Wv
    k_cache[:, :, n] = k;  v_cache[:, :, n] = v              (index_copy_, in place)
    K, V = k_cache[:, :, :past + seq], v_cache[:, :, :past + seq]
    h += softmax(q K^T / sqrt(head_dim) + causal mask) V Wo      (grouped heads: query head
    h += mlp(norm(h))                                             j * groups + g reads kv head j)

The cache write becomes ``index_put_`` on the buffer
(``ExecutorchBackendConfig(run_reinplace_pass=True)``; without it the export copies the whole
cache per step and writes it back). The attention after it has two forms (:data:`ATTENTION`):

- ``"kernel"`` (where the live linears are ``own-kernel``, whose library the runtime loads
  anyway): one ``edgeadapt::cache_attention`` call per layer
  (:mod:`edgeadapt.export.executorch_attention`), edgeadapt's kernel reading the cache buffers
  in place;
- ``"bmm"`` (standard ops only, the other live forms): the two attention GEMMs are XNNPACK's
  ``bmm`` on the (kv_heads, tokens, head_dim) views, the query's grouped heads stacked as rows
  so no key or value is repeated per head; ExecuTorch copies the views' positions out of the
  buffers first (``slice_copy``, outside the delegate), which the kernel form does not.

The live projections keep the base program's live form
(:mod:`edgeadapt.export.executorch_live_form`), since the method calls the same modules of the
same live copy of the model. Llama-family models only (``model_type`` ``llama``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from edgeadapt.errors import ConfigError, ExportError
from edgeadapt.models import LoadedModel, LogitsModule, example_inputs
from edgeadapt.runtime.generate import PREFILL_CHUNK

DECODE_METHOD = "decode"
#: the attention's forms (module docstring)
ATTENTION = ("kernel", "bmm")
#: the model types whose layers :class:`StaticCacheDecoder` knows
SUPPORTED = ("llama",)
#: the smallest --max-context the decoder method is lowered for (its example trace needs room)
MIN_CONTEXT = 8
RTOL = 1e-4
#: how the check walks a 12-token sequence: a prefill of 5, one step of 3, then 4 single steps
CHECK_CHUNKS = (5, 3, 1, 1, 1, 1)


def cache_buffers(layers: int) -> list[list[str]]:
    """``[[k_cache_i, v_cache_i], ...]``: the cache buffers' names, one pair per layer."""
    return [[f"k_cache_{i}", f"v_cache_{i}"] for i in range(layers)]


def max_chunk(max_context: int) -> int:
    """The most new tokens one ``decode`` call takes: the runtime's prefill chunk, or fewer
    where the context is shorter."""
    return min(PREFILL_CHUNK, max_context - 1)


class StaticCacheDecoder(nn.Module):
    """``forward(input_ids, positions, keep) -> logits`` over a Hugging Face Llama-family
    ``...ForCausalLM`` whose cache lives in this module's buffers (module docstring).

    model: the live copy the base program is lowered from (its live weights are buffers); kept
    as ``self.model`` so that their names are the base program's (``model.model.layers...``).
    """

    def __init__(self, model: nn.Module, max_context: int, attention: str = "bmm") -> None:
        super().__init__()
        if attention not in ATTENTION:
            raise ConfigError(f"decoder attention {attention!r}: choose one of "
                              f"{', '.join(ATTENTION)}")
        if attention == "kernel":
            from edgeadapt.export.executorch_attention import define_cache_attention_op

            define_cache_attention_op()
        config = model.config
        if getattr(config, "model_type", None) not in SUPPORTED:
            raise ConfigError(f"--generate: model type {getattr(config, 'model_type', None)!r} "
                              f"has no ExecuTorch decoder yet (supported: {', '.join(SUPPORTED)})")
        attn = model.model.layers[0].self_attn
        self.model = model
        self.layers = int(config.num_hidden_layers)
        self.kv_heads = int(config.num_key_value_heads)
        self.groups = int(attn.num_key_value_groups)
        self.head_dim = int(attn.head_dim)
        self.scaling = float(attn.scaling)
        self.max_context = int(max_context)
        self.attention = attention
        shape = (1, self.kv_heads, self.max_context, self.head_dim)
        for pair in cache_buffers(self.layers):
            for name in pair:
                self.register_buffer(name, torch.zeros(shape))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                keep: torch.Tensor) -> torch.Tensor:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        base = self.model.model
        seq, total = input_ids.shape[1], positions.shape[0]
        kv, groups, dim = self.kv_heads, self.groups, self.head_dim
        new = positions[total - seq:]
        h = base.embed_tokens(input_ids)
        cos, sin = base.rotary_emb(h, new.unsqueeze(0))
        mask = torch.where(positions[None, :] > new[:, None], torch.finfo(h.dtype).min, 0.0) \
            if self.attention == "bmm" else None
        for (k_name, v_name), layer in zip(cache_buffers(self.layers), base.layers, strict=True):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(1, seq, -1, dim).transpose(1, 2)
            k = attn.k_proj(x).view(1, seq, -1, dim).transpose(1, 2)
            v = attn.v_proj(x).view(1, seq, -1, dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k_cache, v_cache = self.get_buffer(k_name), self.get_buffer(v_name)
            k_cache.index_copy_(2, new, k)
            v_cache.index_copy_(2, new, v)
            if self.attention == "kernel":  # (1, seq, heads * dim)
                out = torch.ops.edgeadapt.cache_attention(q.contiguous(), k_cache, v_cache,
                                                          positions, self.scaling)
            else:
                keys = k_cache[:, :, :total].flatten(0, 1)        # (kv, total, dim)
                values = v_cache[:, :, :total].flatten(0, 1)
                rows = q.contiguous().view(kv, groups * seq, dim)  # head j*groups+g: kv head j
                scores = torch.bmm(rows, keys.transpose(1, 2)) * self.scaling
                weights = torch.softmax(scores.view(kv, groups, seq, -1) + mask, dim=-1)
                out = torch.bmm(weights.flatten(1, 2), values)     # (kv, groups * seq, dim)
                out = out.unflatten(1, (groups, seq)).flatten(0, 1).transpose(0, 1).reshape(
                    1, seq, -1)
            h = h + attn.o_proj(out)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        kept = keep.shape[0]
        torch._check(kept <= seq)
        return self.model.lm_head(base.norm(h.narrow(1, seq - kept, kept)))


def decode_program(live_lm: LoadedModel, max_context: int,
                   attention: str = "bmm") -> tuple[Any, dict]:
    """``torch.export`` of :class:`StaticCacheDecoder` over ``live_lm`` (the live copy of the
    base program) with dynamic ``seq`` and ``positions``, its attention in form ``attention``
    (:data:`ATTENTION`); returns (the exported program, the bundle.json entry of the method
    without its ``parity``). ConfigError for a model it does not know or a context below
    :data:`MIN_CONTEXT`."""
    if isinstance(max_context, bool) or not isinstance(max_context, int) \
            or max_context < MIN_CONTEXT:
        raise ConfigError(f"--max-context {max_context!r}: the ExecuTorch decoder needs at least "
                          f"{MIN_CONTEXT} positions")
    wrapper = StaticCacheDecoder(live_lm.model, max_context, attention).eval()
    chunk = max_chunk(max_context)
    seq = torch.export.Dim("seq", min=1, max=chunk)
    total = torch.export.Dim("positions", min=1, max=max_context - 1)
    kept = torch.export.Dim("keep", min=1, max=chunk)
    ids = example_inputs(live_lm, batch=1, seq=3, seed=0)["input_ids"]
    try:  # sizes that pin nothing: 3 new tokens, 7 positions, the last 2 kept
        with torch.no_grad():
            program = torch.export.export(wrapper, (ids, torch.arange(7), torch.zeros(2,
                                          dtype=torch.int64)), strict=False,
                                          dynamic_shapes=({1: seq}, {0: total}, {0: kept}))
    except Exception as exc:  # torch raises many kinds; report them as one
        raise ExportError(f"torch.export of the ExecuTorch decoder failed for {live_lm.name}: "
                          f"{exc}") from exc
    entry = {"method": DECODE_METHOD, "inputs": ["input_ids", "positions", "keep"],
             "cache": cache_buffers(wrapper.layers), "layers": wrapper.layers,
             "kv_heads": wrapper.kv_heads, "head_dim": wrapper.head_dim,
             "max_context": max_context, "max_chunk": chunk, "attention": attention,
             "parity": None}
    return program, entry


def check_in_place(program: Any, attention: str) -> None:
    """ExportError unless the lowered ``decode`` method writes its cache in place: no functional
    ``index_put`` (a copy of the whole cache per step) and no write-back ``copy_`` left; and,
    in the ``kernel`` attention form, reads it in place: no ``slice_copy`` of a cache write's
    result (the held positions copied out, as the ``bmm`` form's are)."""
    graph = program.exported_program(DECODE_METHOD).graph
    calls = [n for n in graph.nodes if n.op == "call_function"]
    copies = sorted({str(n.target) for n in calls
                     if any(op in str(n.target) for op in ("index_put.", "aten.copy_"))})
    if copies:
        raise ExportError(f"the ExecuTorch decoder copies its cache every step ({copies}): the "
                          "in-place rewrite (run_reinplace_pass) did not apply")
    if attention != "kernel":
        return
    held = [n.name for n in calls if "slice_copy" in str(n.target)
            and "index_put_" in str(getattr(n.args[0], "target", ""))]
    if held:
        raise ExportError(f"the ExecuTorch decoder copies its cache's held positions every step "
                          f"({', '.join(held)}) where its attention kernel should read them in "
                          "place")


def check_decoder(lm: LoadedModel, out_dir: Any, result: dict, entry: dict) -> dict:
    """Run the written program's ``decode`` as the runtime does (its decoder over a live store
    of ``model.pte``) on two sequences of 12 tokens, their steps interleaved (so each step of one
    follows the other's: the cache is moved out and back in), chunked as
    :data:`CHECK_CHUNKS`, and compare the logits with the model's full forward (the first
    sequence's at every position, the second's at each step's last, as the runtime's prefill
    asks):
    :func:`edgeadapt.export.decoder.parity_report` (ExportError past :data:`RTOL`; a quantized
    program against the PyTorch model it was lowered from, within
    :func:`edgeadapt.export.executorch_quant.quant_tolerance`: at least ``QUANT_MAX_REL_ERR``,
    more where that model's int8 activations spread under float32 rounding noise).

    result: :func:`edgeadapt.export.executorch.export_pte`'s answer; entry: the decoder's
    bundle.json entry."""
    from edgeadapt.export.decoder import parity_report, step_error
    from edgeadapt.export.executorch_quant import quant_entries, quant_tolerance, reference
    from edgeadapt.runtime.backends.executorch.decoder import EtDecoder
    from edgeadapt.runtime.backends.executorch.store import ExecutorchStore

    weights = result["weights"]
    store = ExecutorchStore(out_dir, result["section"],
                            {w: info["buffer"] for w, info in weights.items()},
                            {w: tuple(info["shape"]) for w, info in weights.items()},
                            quant=quant_entries(result))
    decoder = EtDecoder(store, entry)
    ids = example_inputs(lm, batch=2, seq=sum(CHECK_CHUNKS), seed=11)["input_ids"]
    ref, rtol = reference(lm, result)  # a quantized program: the model it was lowered from
    if result["section"].get("precision", "fp32") != "fp32":  # and that model's own spread
        rtol = quant_tolerance(ref, ["input_ids"], [(2, sum(CHECK_CHUNKS))], seed=11)
    with torch.no_grad():
        want = LogitsModule(ref)(ids).float().numpy()
    caches = [decoder.empty_cache(1), decoder.empty_cache(1)]
    errors, start = [], 0
    for n in CHECK_CHUNKS:
        for row in range(2):
            chunk = np.ascontiguousarray(ids[row:row + 1, start:start + n].numpy())
            keep = 0 if row == 0 else 1
            logits, caches[row] = decoder.step(chunk, caches[row], keep=keep)
            errors.append(step_error(logits[0], want[row], start, n, keep,
                                     "the ExecuTorch decoder"))
        start += n
    return parity_report(errors, CHECK_CHUNKS, max(RTOL, rtol), "the ExecuTorch decoder")
