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
bit for bit. The int8-activation forms (``live_qlinear_a8``, ``live_q4linear_a8``) against
float64 numpy on the activations quantized by numpy (per row, blocks of 32): one token, and
the gathered 32-row strips (partial and full) at every token count, also built without VNNI.
The in-place edit of the codes inside an exported program is checked in
tests/test_executorch_quantized.py."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("executorch")

from edgeadapt.errors import ConfigError  # noqa: E402
from edgeadapt.export.executorch_live_form import (  # noqa: E402
    QKernelLinear,
    packs,
    quantizes_activations,
)
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
N = 21  # 3 full slabs of 6 rows + 3 rows
#: the int8-activation forms' (packed, grid, K, N): K and G multiples of 32 (an odd count of
#: blocks; K = 160: the transposes' short chunk; K = 576, SmolLM2's: more than 16 scale groups),
#: N a partial strip of 32 rows or full ones and a partial one
A8_CASES = [(False, INT8, 96, N), (False, INT8, 160, 70), (False, INT4, 32, N),
            (True, INT4, 96, N), (True, INT4, 160, 70), (True, INT4_G64, 128, 64),
            (True, INT4, 576, 40), (False, INT8, 576, N)]
#: (batch, seq): one token, 6-row slabs with partial / several 64-token panels
SHAPES = [(1, 1), (3, 1), (1, 2), (1, 63), (1, 65), (2, 64), (4, 70)]


def codes(grid: Grid, k: int, seed: int = 0, n: int = N) -> tuple[np.ndarray, np.ndarray]:
    """int8 codes (n, k) and scales of a random weight on ``grid``."""
    rng = np.random.default_rng(seed + k)
    return grid.quantize(rng.standard_normal((n, k)).astype(np.float32))


def program(grid: Grid, k: int, seed: int = 0, packed: bool = False,
            activations: str = "float", n: int = N) -> tuple[bytes, np.ndarray]:
    """A program of one quantized live linear (n x k, no bias) on ``grid`` with dynamic
    (batch, seq), lowered without XNNPACK (``packed``: its int4 codes two per byte;
    ``activations``: QKernelLinear's), and its dequantized weight (n, k), from the codes the
    program holds (:func:`held_codes`)."""
    q, s = codes(grid, k, seed, n)
    lin = QKernelLinear(torch.nn.Linear(k, n, bias=False), torch.from_numpy(q),
                        torch.from_numpy(s), packed, activations).eval()
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


def int8_activations(x: np.ndarray) -> np.ndarray:
    """``A(x)`` in numpy: per row, blocks of 32 columns, ``m = max |x|``, codes
    ``rint(x * (127 / m))`` (float32 product, ties to even) times ``m / 127`` (``m = 0``: 0), as
    MatMulNBits at accuracy level 4 quantizes its activations."""
    blocks = x.astype(np.float32).reshape(*x.shape[:-1], -1, 32)
    m = np.abs(blocks).max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(m > 0, np.float32(127) / m, np.float32(0)).astype(np.float32)
    return (np.rint(blocks * inv) * (m / np.float32(127))).reshape(x.shape)


def check(blob: bytes, wq: np.ndarray, seed: int = 0, activations: str = "float") -> None:
    """Run the program at every shape of :data:`SHAPES` against float64 numpy (``activations``
    "int8": on :func:`int8_activations` of the inputs)."""
    got = outputs(blob, wq.shape[1], seed)
    rng = np.random.default_rng(seed)
    for (b, s), y in zip(SHAPES, got, strict=True):
        x = rng.standard_normal((b, s, wq.shape[1])).astype(np.float32)
        if activations == "int8":
            x = int8_activations(x)
        want = x.astype(np.float64) @ wq.T.astype(np.float64)
        assert y.shape == (b, s, wq.shape[0])
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


@pytest.mark.parametrize("packed,grid,k,n", A8_CASES)
def test_int8_activation_qlinear_matches_numpy(packed, grid, k, n):
    """The ``_a8`` ops: int8 activations times the codes (one token: per-row vpdpbusd over the
    row; more: the gathered strips' int8 tiles), against float64 numpy on ``A(x)``."""
    ek.load_kernel()
    check(*program(grid, k, packed=packed, activations="int8", n=n), activations="int8")


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
    # int8 activations: the same linear on A(x) (numpy's, here), both forms
    xa = torch.from_numpy(int8_activations(x.numpy()))
    want8 = torch.nn.functional.linear(xa, torch.from_numpy(INT4.dequantize(q, s)), lin.bias)
    for held in (False, True):
        a8 = QKernelLinear(torch.nn.Linear(64, N), torch.from_numpy(q), torch.from_numpy(s),
                           packed=held, activations="int8")
        a8.bias = lin.bias
        assert torch.equal(a8(x), want8)
    assert not torch.equal(want8, want)
    with pytest.raises(ConfigError, match="activations 'int4'"):
        QKernelLinear(torch.nn.Linear(64, N), torch.from_numpy(q), torch.from_numpy(s),
                      activations="int4")


def test_int8_activations_need_whole_blocks_of_32():
    """The exporter's choice: int8 activations where the columns and the groups are whole
    blocks of 32, float activations otherwise."""
    assert quantizes_activations(INT4, 64) and quantizes_activations(INT8, 576)
    assert quantizes_activations(INT4_G64, 128)
    assert not quantizes_activations(INT4, 45) and not quantizes_activations(ROW45, 45)


def test_packs_int4_grids_only():
    assert packs(INT4) and packs(INT4_G64) and not packs(INT8) and not packs(ROW45)


PORTABLE = """
import pickle, sys
sys.path.insert(0, {tests!r})
from edgeadapt.runtime import native
from edgeadapt.runtime.backends.executorch import kernel as ek
ek._LIBRARY = native.Library(lambda: ek.library_path(({flag!r},)), ek.ctypes.RTLD_GLOBAL)
ek.load_kernel()
import test_executorch_qkernel as t
if {float_forms!r}:
    for grid, k in t.CASES:
        t.check(*t.program(grid, k))
    for grid, k in t.PACKED_CASES:
        t.check(*t.program(grid, k, packed=True))
        t.check_same_bits(grid, k)
for packed, grid, k, n in t.A8_CASES:
    t.check(*t.program(grid, k, packed=packed, activations="int8", n=n), activations="int8")
print("portable ok")
"""


@pytest.mark.parametrize("flag", ["-mno-avx512f", "-mno-avx512vnni"])
def test_portable_path_matches_numpy(tmp_path, flag):
    """The plain C++ loops (a library of its own, in a process of its own), both forms; without
    VNNI, the int8 activations' int4 path on vpmaddubsw and the int8 codes' plain C++ (where the
    build machine has VNNI, else the same library as the default one)."""
    from pathlib import Path

    env = {**__import__("os").environ, "EDGEADAPT_CACHE": str(tmp_path)}
    script = PORTABLE.format(tests=str(Path(__file__).parent), flag=flag,
                             float_forms=flag == "-mno-avx512f")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0 and "portable ok" in done.stdout, done.stderr[-3000:]
