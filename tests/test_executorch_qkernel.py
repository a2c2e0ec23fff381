"""edgeadapt's quantized ExecuTorch kernel, ``edgeadapt::live_qlinear.out``
(kernels/live_linear.cpp): int8 codes ``(out, in)`` with a scale per row and group of columns
(the grids' groups of 32, or one group per row), against float64 numpy on the dequantized
weight: the one-token GEMV and the dequantized slabs above (full and leftover slabs, partial
and several token panels), on the vector path and the portable one (built with
``-mno-avx512f`` and run in a process of its own: a second copy of the library would register
the operators twice). The in-place edit of the codes inside an exported program is checked in
tests/test_executorch_quantized.py."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("executorch")

from edgeadapt.export.executorch_live_form import QKernelLinear  # noqa: E402
from edgeadapt.format.quant import INT4, INT8, Grid  # noqa: E402
from edgeadapt.runtime.backends.executorch import kernel as ek  # noqa: E402

pytestmark = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("c++", "g++", "clang++")), reason="no C++ compiler")

#: one scale per row (one group of K = 45 columns: the GEMV's scalar remainder)
ROW45 = Grid("int8-row", 8, 45)
CASES = [(ROW45, 45), (INT8, 96), (INT4, 96), (INT4, 32)]
#: (batch, seq): one token, 6-row slabs with partial / several 64-token panels
SHAPES = [(1, 1), (3, 1), (1, 2), (1, 63), (1, 65), (2, 64), (4, 70)]
N = 20  # 3 full slabs of 6 rows + 2 rows


def program(grid: Grid, k: int, seed: int = 0) -> tuple[bytes, np.ndarray]:
    """A program of one quantized live linear (N x k, no bias) on ``grid`` with dynamic
    (batch, seq), lowered without XNNPACK, and its dequantized weight (N, k)."""
    rng = np.random.default_rng(seed + k)
    q, s = grid.quantize(rng.standard_normal((N, k)).astype(np.float32))
    lin = QKernelLinear(torch.nn.Linear(k, N, bias=False), torch.from_numpy(q),
                        torch.from_numpy(s)).eval()
    from executorch.exir import to_edge_transform_and_lower

    batch, seq = torch.export.Dim("batch", min=1, max=4), torch.export.Dim("seq", min=1, max=80)
    ep = torch.export.export(lin, (torch.randn(2, 8, k),),
                             dynamic_shapes=({0: batch, 1: seq},), strict=False)
    blob = bytes(to_edge_transform_and_lower(ep, partitioner=[]).to_executorch().buffer)
    return blob, grid.dequantize(q, s)


def check(blob: bytes, wq: np.ndarray, seed: int = 0) -> None:
    """Run the program at every shape of :data:`SHAPES` against float64 numpy."""
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(blob).load_method("forward")
    rng = np.random.default_rng(seed)
    for b, s in SHAPES:
        x = rng.standard_normal((b, s, wq.shape[1])).astype(np.float32)
        got = method.execute([torch.from_numpy(x)])[0].numpy()
        want = x.astype(np.float64) @ wq.T.astype(np.float64)
        assert got.shape == (b, s, N)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4, err_msg=f"{b}x{s}")


@pytest.mark.parametrize("grid,k", CASES)
def test_qlinear_matches_numpy(grid, k):
    ek.load_kernel()
    check(*program(grid, k))


def test_eager_op_is_the_dequantized_linear():
    """The PyTorch definition (what torch.export traces and the export checks against) is
    ``x @ (q s)^T`` with the grid's float32 products."""
    q, s = INT4.quantize(np.random.default_rng(2).standard_normal((N, 64)).astype(np.float32))
    lin = QKernelLinear(torch.nn.Linear(64, N), torch.from_numpy(q), torch.from_numpy(s))
    x = torch.randn(3, 64)
    want = torch.nn.functional.linear(x, torch.from_numpy(INT4.dequantize(q, s)), lin.bias)
    assert torch.equal(lin(x), want)


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
print("portable ok")
"""


def test_portable_path_matches_numpy(tmp_path):
    """The plain C++ loops (a library of its own, in a process of its own)."""
    from pathlib import Path

    env = {**__import__("os").environ, "EDGEADAPT_CACHE": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", PORTABLE.format(tests=str(Path(__file__).parent))],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0 and "portable ok" in done.stdout, done.stderr[-3000:]
