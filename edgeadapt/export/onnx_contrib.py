"""PyTorch operators that export to ONNX Runtime's fused kernels (CPU and CUDA; its contrib
ops), for the KV-cache decoder graph: each has a plain PyTorch reference implementation (what
the decoder's tests compare with) and maps 1:1 onto its ONNX Runtime op
(:func:`translation_table`, for ``torch.onnx.export``).

**RMS norm** (``torch.ops.edgeadapt.rms_norm`` -> ``SimplifiedLayerNormalization``), Llama's
``LlamaRMSNorm``: ``y = w * x / sqrt(mean(x^2, last axis) + eps)``, one kernel instead of the
six elementwise ops the exporter writes for it.

**Grouped-query attention** with a key/value cache written in place
(``torch.ops.edgeadapt.gqa`` -> ``GroupQueryAttention``): the decoder attends in one kernel per
layer and never copies its cache.

For ``S`` new tokens after ``P`` cached ones (``total = P + S``), ``H`` query heads and
``G`` key/value heads of size ``D``::

    q, k        = rope(q, P .. total - 1), rope(k, P .. total - 1)     (half-split rotary, the
                                                                       cos/sin caches' rows)
    cache_k[:, :, P:total] = k;  cache_v[:, :, P:total] = v            (returned as presents)
    out_h       = softmax(q_h cache_k[g(h)][:total]^T * scale + causal) cache_v[g(h)][:total]

with ``g(h) = h // (H / G)``, the query at position ``P + i`` seeing keys ``0 .. P + i``, and
``rope(x)`` = ``[x1 c - x2 s, x2 c + x1 s]`` over the halves of each head (Llama's
``rotate_half``: ``GroupQueryAttention``'s ``rotary_interleaved = 0``).

Operator inputs (the ONNX op's order): ``q`` (batch, S, H*D), ``k`` / ``v`` (batch, S, G*D),
``past_key`` / ``past_value`` (batch, G, C, D) with ``C >= total`` cache positions,
``seqlens_k`` int32 (batch,) = total - 1, ``total`` int32 scalar, ``cos`` / ``sin``
(positions, D / 2); attributes ``num_heads``, ``kv_heads``, ``scale``. Outputs: the attention
(batch, S, H*D) and the presents, of the pasts' shape. ONNX Runtime writes the presents into
the pasts' memory when both are bound to the same buffer (``past_present_share_buffer``): the
runtime's decoder binds one preallocated buffer per cache tensor as both.

The PyTorch implementation below is the reference (functional: the presents are new tensors)
that the decoder's own tests compare with; the export maps the operator 1:1 onto the ONNX op.
"""

from __future__ import annotations

import torch

DOMAIN = "com.microsoft"


@torch.library.custom_op("edgeadapt::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``w * x / sqrt(mean(x^2) + eps)`` over the last axis, computed in float32 as
    ``LlamaRMSNorm`` does."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


@rms_norm.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape)


@torch.library.custom_op("edgeadapt::gqa", mutates_args=())
def gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_key: torch.Tensor,
        past_value: torch.Tensor, seqlens_k: torch.Tensor, total: torch.Tensor,
        cos: torch.Tensor, sin: torch.Tensor, num_heads: int, kv_heads: int, scale: float
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The formula of the module docstring, in plain PyTorch (batch rows of equal length)."""
    batch, seq, _ = q.shape
    dim = q.shape[-1] // num_heads
    end = int(total)
    start = end - seq
    c, s = cos[start:end][None, :, None, :], sin[start:end][None, :, None, :]

    def rope(x: torch.Tensor, heads: int) -> torch.Tensor:
        x = x.reshape(batch, seq, heads, dim)
        x1, x2 = x[..., : dim // 2], x[..., dim // 2:]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).transpose(1, 2)

    qh, kh = rope(q, num_heads), rope(k, kv_heads)
    vh = v.reshape(batch, seq, kv_heads, dim).transpose(1, 2)
    present_key, present_value = past_key.clone(), past_value.clone()
    present_key[:, :, start:end] = kh
    present_value[:, :, start:end] = vh
    group = num_heads // kv_heads
    keys = present_key[:, :, :end].repeat_interleave(group, dim=1)
    values = present_value[:, :, :end].repeat_interleave(group, dim=1)
    scores = torch.matmul(qh, keys.transpose(2, 3)) * scale
    visible = torch.arange(end)[None, :] <= (torch.arange(seq) + start)[:, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), values)
    return out.transpose(1, 2).reshape(batch, seq, num_heads * dim), present_key, present_value


@gqa.register_fake
def _(q, k, v, past_key, past_value, seqlens_k, total, cos, sin, num_heads, kv_heads, scale):
    return q.new_empty(q.shape), past_key.new_empty(past_key.shape), \
        past_value.new_empty(past_value.shape)


def _schema(name: str, domain: str, inputs: list[tuple[str, str]], outputs: list[str],
            types: list[tuple[str, list[str]]], attributes: dict[str, str]):
    """The part of an ONNX Runtime contrib op's schema the export uses (ONNX's registry does not
    hold them; onnxscript needs one to emit a node). inputs: (name, type variable); outputs
    take type ``T``; attributes: name -> ``INT`` | ``FLOAT``."""
    from onnx.defs import OpSchema

    return OpSchema(
        name, domain, 1,
        inputs=[OpSchema.FormalParameter(n, t) for n, t in inputs],
        outputs=[OpSchema.FormalParameter(n, "T") for n in outputs],
        type_constraints=[(t, allowed, "") for t, allowed in types],
        attributes=[OpSchema.Attribute(n, getattr(OpSchema.AttrType, kind), "")
                    for n, kind in attributes.items()])


FLOATS = ("T", ["tensor(float)", "tensor(float16)"])


def translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export``: the operators above as ONNX
    Runtime's ``SimplifiedLayerNormalization`` and ``GroupQueryAttention`` (rotary applied by
    the op, ``rotary_interleaved = 0``)."""
    import onnxscript

    # ONNX Runtime registers SimplifiedLayerNormalization in the ONNX domain (since version 1),
    # GroupQueryAttention in com.microsoft
    norm = onnxscript.values.Op(onnxscript.values.Opset("", 1), "SimplifiedLayerNormalization",
                                _schema("SimplifiedLayerNormalization", "", [("X", "T"),
                                        ("scale", "T")], ["Y"], [FLOATS],
                                        {"axis": "INT", "epsilon": "FLOAT"}))
    opset = onnxscript.values.Opset(DOMAIN, 1)
    attention = onnxscript.values.Op(opset, "GroupQueryAttention", _schema(
        "GroupQueryAttention", DOMAIN,
        [(n, "T") for n in ("query", "key", "value", "past_key", "past_value")]
        + [("seqlens_k", "M"), ("total_sequence_length", "M"), ("cos_cache", "T"),
           ("sin_cache", "T")],
        ["output", "present_key", "present_value"], [FLOATS, ("M", ["tensor(int32)"])],
        {"num_heads": "INT", "kv_num_heads": "INT", "scale": "FLOAT", "do_rotary": "INT",
         "rotary_interleaved": "INT"}))

    def rms_norm_onnx(x, weight, eps: float):
        return norm(x, weight, axis=-1, epsilon=eps)

    def gqa_onnx(q, k, v, past_key, past_value, seqlens_k, total, cos, sin,
                 num_heads: int, kv_heads: int, scale: float):
        return attention(q, k, v, past_key, past_value, seqlens_k, total, cos, sin,
                         num_heads=num_heads, kv_num_heads=kv_heads, scale=scale,
                         do_rotary=1, rotary_interleaved=0)

    return {torch.ops.edgeadapt.rms_norm.default: rms_norm_onnx,
            torch.ops.edgeadapt.gqa.default: gqa_onnx}
