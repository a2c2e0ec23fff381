"""Grouped-query attention with a key/value cache written in place: a PyTorch operator
(``torch.ops.edgeadapt.gqa``) that exports to ONNX Runtime's fused ``com.microsoft``
``GroupQueryAttention`` (CPU and CUDA), so the decoder graph attends in one kernel per layer
and never copies its cache.

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


def _schema():
    """The part of ``GroupQueryAttention``'s schema the export uses (ONNX's registry does not
    hold ONNX Runtime's contrib ops; onnxscript needs one to emit a node)."""
    from onnx.defs import OpSchema

    def param(name: str, type_str: str) -> OpSchema.FormalParameter:
        return OpSchema.FormalParameter(name, type_str)

    inputs = [param(n, "T") for n in ("query", "key", "value", "past_key", "past_value")]
    inputs += [param("seqlens_k", "M"), param("total_sequence_length", "M"),
               param("cos_cache", "T"), param("sin_cache", "T")]
    attr = OpSchema.AttrType
    return OpSchema(
        "GroupQueryAttention", DOMAIN, 1, inputs=inputs,
        outputs=[param(n, "T") for n in ("output", "present_key", "present_value")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""),
                          ("M", ["tensor(int32)"], "")],
        attributes=[OpSchema.Attribute("num_heads", attr.INT, ""),
                    OpSchema.Attribute("kv_num_heads", attr.INT, ""),
                    OpSchema.Attribute("scale", attr.FLOAT, ""),
                    OpSchema.Attribute("do_rotary", attr.INT, ""),
                    OpSchema.Attribute("rotary_interleaved", attr.INT, "")])


def translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export``: the operator as ONNX Runtime's
    ``GroupQueryAttention`` (rotary applied by the op, ``rotary_interleaved = 0``)."""
    import onnxscript

    op = onnxscript.values.Op(onnxscript.values.Opset(DOMAIN, 1), "GroupQueryAttention",
                              _schema())

    def gqa_onnx(q, k, v, past_key, past_value, seqlens_k, total, cos, sin,
                 num_heads: int, kv_heads: int, scale: float):
        return op(
            q, k, v, past_key, past_value, seqlens_k, total, cos, sin,
            num_heads=num_heads, kv_num_heads=kv_heads, scale=scale, do_rotary=1,
            rotary_interleaved=0)

    return {torch.ops.edgeadapt.gqa.default: gqa_onnx}
