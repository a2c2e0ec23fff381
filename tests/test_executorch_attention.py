"""edgeadapt's ExecuTorch attention kernel (``edgeadapt::cache_attention.out``, the decoder's
attention in programs with the ``own-kernel`` live form) against a float64 numpy loop of the
formula: grouped and plain heads, head sizes on and off the 16-lane width, one block of
positions and several (the split-K merge), one new token and a whole prefill (the causal
rows), on a program run by the ExecuTorch runtime; the vector and the portable build. The
decoder built on it is checked against transformers in tests/test_generate_executorch.py."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("executorch")

from edgeadapt.export.executorch_attention import (  # noqa: E402
    cache_attention_reference,
    define_cache_attention_op,
)
from edgeadapt.runtime.backends.executorch import kernel as ek  # noqa: E402

needs_compiler = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("c++", "g++", "clang++")), reason="no C++ compiler")

#: (heads, kv heads, head size, cache positions) per program; the kernel's blocks are 128
#: positions, so 300 positions make three
LAYOUTS = [(4, 2, 16, 300), (6, 3, 20, 40), (3, 3, 64, 200)]
#: (new tokens S, positions held T) per run
STEPS = [(1, 1), (1, 7), (3, 7), (7, 7), (1, 128), (1, 129), (5, 200), (16, 40)]


def numpy_attention(q, k, v, total, scale):
    """out (1, S, H D) in float64 loops over heads and tokens (module docstring of
    edgeadapt.export.executorch_attention): token i of S sees positions < total - S + i + 1."""
    _, heads, seq, dim = q.shape
    group = heads // k.shape[1]
    out = np.zeros((1, seq, heads * dim))
    for h in range(heads):
        keys, values = k[0, h // group].astype(np.float64), v[0, h // group].astype(np.float64)
        for i in range(seq):
            seen = total - seq + i + 1
            s = scale * (keys[:seen] @ q[0, h, i].astype(np.float64))
            w = np.exp(s - s.max())
            out[0, i, h * dim:(h + 1) * dim] = (w / w.sum()) @ values[:seen]
    return out


class Attention(torch.nn.Module):
    def __init__(self, scale: float) -> None:
        super().__init__()
        define_cache_attention_op()
        self.scale = scale

    def forward(self, q, k, v, positions):
        return torch.ops.edgeadapt.cache_attention(q, k, v, positions, self.scale)


def program(heads: int, kv: int, dim: int, context: int):
    """(the program, its method) of one :class:`Attention` call, S and T dynamic (the method
    lives as long as its program is referenced)."""
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    seq = torch.export.Dim("seq", min=1, max=min(context, 128))
    total = torch.export.Dim("total", min=1, max=context)
    example = (torch.randn(1, heads, 3, dim), torch.randn(1, kv, context, dim),
               torch.randn(1, kv, context, dim), torch.arange(9))
    ep = torch.export.export(Attention(dim ** -0.5), example, strict=False,
                             dynamic_shapes=({2: seq}, None, None, {0: total}))
    blob = bytes(to_edge_transform_and_lower(ep, partitioner=[]).to_executorch().buffer)
    loaded = Runtime.get().load_program(blob)
    return loaded, loaded.load_method("forward")


def check(layout) -> None:
    heads, kv, dim, context = layout
    loaded, method = program(*layout)
    rng = np.random.default_rng(sum(layout))
    k = rng.standard_normal((1, kv, context, dim)).astype(np.float32)
    v = rng.standard_normal((1, kv, context, dim)).astype(np.float32)
    for seq, total in STEPS:
        if total > context or seq > min(context, 128):
            continue
        q = (3 * rng.standard_normal((1, heads, seq, dim))).astype(np.float32)  # peaked weights
        got = method.execute([torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v),
                              torch.arange(total)])[0].numpy()
        want = numpy_attention(q, k, v, total, dim ** -0.5)
        assert got.shape == want.shape, (layout, seq, total)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6,
                                   err_msg=f"{layout} S={seq} T={total}")


def test_eager_op_is_the_formula():
    """The PyTorch definition (what torch.export traces and the decoder's check compares with)
    against the numpy loop."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 6, 5, 20)).astype(np.float32)
    k, v = (rng.standard_normal((1, 3, 30, 20)).astype(np.float32) for _ in range(2))
    got = cache_attention_reference(*(torch.from_numpy(a) for a in (q, k, v)),
                                    torch.arange(12), 0.3)
    np.testing.assert_allclose(got.numpy(), numpy_attention(q, k, v, 12, 0.3), rtol=1e-5,
                               atol=1e-6)


@needs_compiler
@pytest.mark.parametrize("layout", LAYOUTS)
def test_attention_kernel_matches_numpy(layout):
    ek.load_kernel()
    check(layout)


@needs_compiler
def test_attention_kernel_reads_the_cache_it_is_given():
    """An edit of a held position's key changes the next call's output (nothing cached), and
    a position past T does not (the kernel reads the T positions held, no more)."""
    ek.load_kernel()
    loaded, method = program(4, 2, 16, 40)
    rng = np.random.default_rng(5)
    q = rng.standard_normal((1, 4, 1, 16)).astype(np.float32)
    k, v = (rng.standard_normal((1, 2, 40, 16)).astype(np.float32) for _ in range(2))

    def run():
        return method.execute([torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v),
                               torch.arange(10)])[0].numpy().copy()

    before = run()
    v[0, 1, 20] += 100.0  # past T = 10
    np.testing.assert_array_equal(run(), before)
    k[0, 1, 3] += 1.0
    after = run()
    np.testing.assert_array_equal(after[0, 0, :32], before[0, 0, :32])  # kv head 0's heads
    assert not np.array_equal(after[0, 0, 32:], before[0, 0, 32:])
    np.testing.assert_allclose(after, numpy_attention(q, k, v, 10, 0.25), rtol=1e-5, atol=2e-6)


PORTABLE = """
import sys
sys.path.insert(0, {tests!r})
from edgeadapt.runtime import native
from edgeadapt.runtime.backends.executorch import kernel as ek
ek._ATTENTION = native.Library(lambda: ek.attention_library_path(("-mno-avx512f",)),
                               ek.ctypes.RTLD_GLOBAL)
ek.load_kernel()
import test_executorch_attention as t
for layout in t.LAYOUTS:
    t.check(layout)
print("portable ok")
"""


@needs_compiler
def test_portable_path_matches_numpy(tmp_path):
    """The plain C++ loops and std::exp (a library of its own, in a process of its own)."""
    from pathlib import Path

    env = {**__import__("os").environ, "EDGEADAPT_CACHE": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", PORTABLE.format(tests=str(Path(__file__).parent))],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0 and "portable ok" in done.stdout, done.stderr[-3000:]


def _lowered_decoder(attention: str):
    """tiny SmolLM2's decode method (q/v live, own-kernel) lowered with its cache written in
    place, its attention in form ``attention``."""
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower

    from edgeadapt.export.executorch import build_live_model
    from edgeadapt.export.executorch_decoder import DECODE_METHOD, decode_program
    from edgeadapt.models import load_model

    lm = load_model("tiny-smollm2", seed=0)
    live = [n for n, _ in lm.model.named_parameters() if n.endswith(("q_proj.weight",
                                                                     "v_proj.weight"))]
    program, _ = decode_program(build_live_model(lm, live, None, "own-kernel"), 16, attention)
    return to_edge_transform_and_lower({DECODE_METHOD: program}, partitioner=[]).to_executorch(
        ExecutorchBackendConfig(run_reinplace_pass=True))


def test_only_the_kernel_form_reads_the_cache_in_place():
    """The export's check: the kernel form has no copy of the held positions; the bmm form
    copies them out of every buffer (what the kernel form exists to avoid), so the check
    refuses it as a kernel form."""
    from edgeadapt.errors import ExportError
    from edgeadapt.export.executorch_decoder import check_in_place

    check_in_place(_lowered_decoder("kernel"), "kernel")
    bmm = _lowered_decoder("bmm")
    check_in_place(bmm, "bmm")
    with pytest.raises(ExportError, match="held positions"):
        check_in_place(bmm, "kernel")
