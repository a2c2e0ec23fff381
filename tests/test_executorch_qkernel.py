"""edgeadapt's quantized ExecuTorch kernels (kernels/live_linear.cpp):
``edgeadapt::live_qlinear.out``, int8 codes ``(out, in)`` a code per byte, and
``edgeadapt::live_q4linear.out``, int4 codes packed two per byte ``(out, in / 32, 16)``
(format/nibbles.py), each with a scale per row and group of columns (the grids' groups of 32,
or one group per row, or 64 on the packed form: two blocks per group), against float64 numpy
on the dequantized weight (the packed form's codes unpacked here by the formula of the kernel's
header, not by nibbles): the one-token GEMV and the dequantized slabs above (full and leftover
slabs of an odd row count, partial and several token panels), on the vector path and the
portable one (built with ``-mno-avx512f`` and run in a process of its own: a second copy of
the library would register the operators twice); and the two forms on the same int4 codes,
bit for bit. The in-place edit of the codes inside an exported program is checked in
tests/test_executorch_quantized.py."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("executorch")

from edgeadapt.export.executorch_live_form import QKernelLinear, packs  # noqa: E402
from edgeadapt.format import nibbles  # noqa: E402
from edgeadapt.format.quant import INT4, INT8, Grid  # noqa: E402
from edgeadapt.runtime.backends.executorch import kernel as ek  # noqa: E402

pytestmark = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("c++", "g++", "clang++")), reason="no C++ compiler")

#: one scale per row (one group of K = 45 columns: the GEMV's scalar remainder)
ROW45 = Grid("int8-row", 8, 45)
#: int4 groups of 64 columns: two packed blocks per scale
INT4_G64 = Grid("int4-g64", 4, 64)
CASES = [(ROW45, 45), (INT8, 96), (INT4, 96), (INT4, 32)]
#: the packed form's: K a multiple of 32
PACKED_CASES = [(INT4, 96), (INT4, 32), (INT4_G64, 128)]
#: (batch, seq): one token, 6-row slabs with partial / several 64-token panels
SHAPES = [(1, 1), (3, 1), (1, 2), (1, 63), (1, 65), (2, 64), (4, 70)]
N = 21  # 3 full slabs of 6 rows + 3 rows


def codes(grid: Grid, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """int8 codes (N, k) and scales of a random weight on ``grid``."""
    rng = np.random.default_rng(seed + k)
    return grid.quantize(rng.standard_normal((N, k)).astype(np.float32))


def program(grid: Grid, k: int, seed: int = 0, packed: bool = False
            ) -> tuple[bytes, np.ndarray]:
    """A program of one quantized live linear (N x k, no bias) on ``grid`` with dynamic
    (batch, seq), lowered without XNNPACK (``packed``: its int4 codes two per byte), and its
    dequantized weight (N, k), from the codes the program holds (:func:`held_codes`)."""
    q, s = codes(grid, k, seed)
    lin = QKernelLinear(torch.nn.Linear(k, N, bias=False), torch.from_numpy(q),
                        torch.from_numpy(s), packed).eval()
    from executorch.exir import to_edge_transform_and_lower

    batch, seq = torch.export.Dim("batch", min=1, max=4), torch.export.Dim("seq", min=1, max=80)
    ep = torch.export.export(lin, (torch.randn(2, 8, k),),
                             dynamic_shapes=({0: batch, 1: seq},), strict=False)
    blob = bytes(to_edge_transform_and_lower(ep, partitioner=[]).to_executorch().buffer)
    held = held_codes(lin.weight.numpy()) if packed else lin.weight.numpy()
    np.testing.assert_array_equal(held, q)
    return blob, grid.dequantize(held, s)


def held_codes(p: np.ndarray) -> np.ndarray:
    """The codes (N, K) of packed bytes ``p (N, K / 32, 16)`` by the formula of the kernel's
    header: ``q[n, 32 b + j] = (p[n, b, j] & 15) - 8``, ``q[n, 32 b + 16 + j] = (p >> 4) - 8``."""
    assert p.dtype == np.uint8 and p.ndim == 3 and p.shape[2] == 16
    q = np.empty((p.shape[0], p.shape[1], 32), np.int8)
    q[..., :16] = (p & 15).astype(np.int8) - 8
    q[..., 16:] = (p >> 4).astype(np.int8) - 8
    return q.reshape(p.shape[0], -1)


def outputs(blob: bytes, k: int, seed: int = 0) -> list[np.ndarray]:
    """The program's output at every shape of :data:`SHAPES` on inputs ``seed``."""
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(blob)  # the method needs its program alive
    method = program.load_method("forward")
    rng = np.random.default_rng(seed)
    return [method.execute([torch.from_numpy(
        rng.standard_normal((b, s, k)).astype(np.float32))])[0].numpy() for b, s in SHAPES]


def check(blob: bytes, wq: np.ndarray, seed: int = 0) -> None:
    """Run the program at every shape of :data:`SHAPES` against float64 numpy."""
    got = outputs(blob, wq.shape[1], seed)
    rng = np.random.default_rng(seed)
    for (b, s), y in zip(SHAPES, got, strict=True):
        x = rng.standard_normal((b, s, wq.shape[1])).astype(np.float32)
        want = x.astype(np.float64) @ wq.T.astype(np.float64)
        assert y.shape == (b, s, N)
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-4, err_msg=f"{b}x{s}")


def check_same_bits(grid: Grid, k: int) -> None:
    """The packed and the one-byte form on the same codes give the same bits at every shape."""
    one = outputs(program(grid, k)[0], k)
    two = outputs(program(grid, k, packed=True)[0], k)
    for (b, s), y1, y2 in zip(SHAPES, one, two, strict=True):
        np.testing.assert_array_equal(y2, y1, err_msg=f"{b}x{s}")


@pytest.mark.parametrize("grid,k", CASES)
def test_qlinear_matches_numpy(grid, k):
    ek.load_kernel()
    check(*program(grid, k))


@pytest.mark.parametrize("grid,k", PACKED_CASES)
def test_packed_qlinear_matches_numpy(grid, k):
    ek.load_kernel()
    check(*program(grid, k, packed=True))


@pytest.mark.parametrize("grid,k", PACKED_CASES)
def test_packed_and_one_byte_forms_give_the_same_bits(grid, k):
    """16 accumulators over the same 16-column chunks in the same order (low nibbles, then high),
    the same slab products: the packed form changes the bytes read, not the arithmetic."""
    ek.load_kernel()
    check_same_bits(grid, k)


def test_eager_op_is_the_dequantized_linear():
    """The PyTorch definition (what torch.export traces and the export checks against) is
    ``x @ (q s)^T`` with the grid's float32 products."""
    q, s = INT4.quantize(np.random.default_rng(2).standard_normal((N, 64)).astype(np.float32))
    lin = QKernelLinear(torch.nn.Linear(64, N), torch.from_numpy(q), torch.from_numpy(s))
    x = torch.randn(3, 64)
    want = torch.nn.functional.linear(x, torch.from_numpy(INT4.dequantize(q, s)), lin.bias)
    assert torch.equal(lin(x), want)
    packed = QKernelLinear(torch.nn.Linear(64, N), torch.from_numpy(q), torch.from_numpy(s),
                           packed=True)
    packed.bias = lin.bias
    assert packed.weight.dtype == torch.uint8 and tuple(packed.weight.shape) == (N, 2, 16)
    np.testing.assert_array_equal(packed.weight.numpy(),
                                  nibbles.pack(q.reshape(N, 2, 32)))  # the switch's bytes
    assert torch.equal(packed.codes(), torch.from_numpy(q))
    assert torch.equal(packed(x), want)


def test_packs_int4_grids_only():
    assert packs(INT4) and packs(INT4_G64) and not packs(INT8) and not packs(ROW45)


PORTABLE = """
import pickle, sys
sys.path.insert(0, {tests!r})
from edgeadapt.runtime import native
from edgeadapt.runtime.backends.executorch import kernel as ek
ek._LIBRARY = native.Library(lambda: ek.library_path(("-mno-avx512f",)), ek.ctypes.RTLD_GLOBAL)
ek.load_kernel()
import test_executorch_qkernel as t
for grid, k in t.CASES:
    t.check(*t.program(grid, k))
for grid, k in t.PACKED_CASES:
    t.check(*t.program(grid, k, packed=True))
    t.check_same_bits(grid, k)
print("portable ok")
"""


def test_portable_path_matches_numpy(tmp_path):
    """The plain C++ loops (a library of its own, in a process of its own), both forms."""
    from pathlib import Path

    env = {**__import__("os").environ, "EDGEADAPT_CACHE": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", PORTABLE.format(tests=str(Path(__file__).parent))],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0 and "portable ok" in done.stdout, done.stderr[-3000:]
