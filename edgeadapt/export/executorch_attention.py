"""The decoder's attention as one operator, ``edgeadapt::cache_attention``, which edgeadapt's
ExecuTorch kernel (``edgeadapt/runtime/kernels/cache_attention.cpp``) computes reading the
static KV cache buffers in place::

    cache_attention(q (1, H, S, D), k_cache, v_cache (1, KV, C, D), positions (T,), scale)
        -> out (1, S, H * D)
    out[0, i, h D + d] = sum_{p < T - S + i + 1} softmax_p(scale q[h, i] . k[j, p]) v[j, p, d]
                                                       (h = j G + g: grouped heads, H = KV G)

``positions``' length T is the positions held (its values unread): the new S tokens' keys and
values sit at T - S .. T - 1, already written. Written with standard ops instead
(:class:`edgeadapt.export.executorch_decoder.StaticCacheDecoder`'s ``bmm`` form), ExecuTorch
copies the held prefix of every cache buffer (``slice_copy``) before XNNPACK's ``bmm`` reads it:
47 MB a step at 1,024 positions on SmolLM2 (docs/generate.md). The operator is exported where
the live linears use edgeadapt's own kernel (live form ``own-kernel``), whose library is loaded
wherever such a program runs anyway.
"""

from __future__ import annotations

import torch

_OP_LIB: object = None


def cache_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              positions: torch.Tensor, scale: float) -> torch.Tensor:
    """The operator's formula (module docstring) in PyTorch: its eager implementation and the
    tests' reference."""
    _, heads, seq, dim = q.shape
    kv, total = k_cache.shape[1], positions.shape[0]
    keys = k_cache[0, :, :total].repeat_interleave(heads // kv, dim=0)  # (H, T, D)
    values = v_cache[0, :, :total].repeat_interleave(heads // kv, dim=0)
    scores = torch.matmul(q[0], keys.transpose(1, 2)) * scale           # (H, S, T)
    new = torch.arange(total - seq, total)
    hidden = torch.arange(total)[None, :] > new[:, None]                 # (S, T)
    weights = torch.softmax(scores.masked_fill(hidden, float("-inf")), dim=-1)
    return torch.matmul(weights, values).transpose(0, 1).reshape(1, seq, heads * dim)


def define_cache_attention_op() -> None:
    """Register ``torch.ops.edgeadapt.cache_attention`` and its ``.out`` variant with PyTorch
    (eager :func:`cache_attention_reference`, shape function), once per process, so that
    torch.export can trace the decoder and ExecuTorch emit the out variant its kernel
    implements."""
    global _OP_LIB
    if _OP_LIB is not None:
        return
    lib = torch.library.Library("edgeadapt", "FRAGMENT")
    args = "Tensor q, Tensor k_cache, Tensor v_cache, Tensor positions, float scale"
    lib.define(f"cache_attention({args}) -> Tensor")
    lib.define(f"cache_attention.out({args}, *, Tensor(a!) out) -> Tensor(a!)")

    def eager_out(q, k_cache, v_cache, positions, scale, *, out):
        result = cache_attention_reference(q, k_cache, v_cache, positions, scale)
        return out.resize_(result.shape).copy_(result)

    lib.impl("cache_attention", cache_attention_reference, "CompositeExplicitAutograd")
    lib.impl("cache_attention.out", eager_out, "CompositeExplicitAutograd")
    torch.library.register_fake(
        "edgeadapt::cache_attention",
        lambda q, k, v, positions, scale: q.new_empty((1, q.shape[2], q.shape[1] * q.shape[3])),
        lib=lib)
    _OP_LIB = lib
