"""edgeadapt's own ExecuTorch kernel (``edgeadapt::live_linear.out``, the ``own-kernel`` live
form) against ``torch.nn.functional.linear``: every path of the kernel (one-token GEMV, full
AVX-512 row slabs, leftover rows, partial token panels, several panels) on a program run by the
ExecuTorch runtime. The exported-model checks (verified against PyTorch before and after
in-place edits) are in tests/test_export_executorch.py."""

from __future__ import annotations

import shutil

import pytest
import torch

pytest.importorskip("executorch")

from edgeadapt.errors import ConfigError  # noqa: E402
from edgeadapt.export.executorch_live_form import KernelLinear  # noqa: E402
from edgeadapt.runtime import native  # noqa: E402
from edgeadapt.runtime.backends.executorch import kernel as ek  # noqa: E402

needs_compiler = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("c++", "g++", "clang++")), reason="no C++ compiler")


class Two(torch.nn.Module):
    """Two live linears in a row: 48 rows (8 full slabs of 6) and 20 rows (3 slabs + 2 rows),
    K = 40 (not a multiple of 16: the GEMV's scalar tail)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = KernelLinear(torch.nn.Linear(40, 48))
        self.b = KernelLinear(torch.nn.Linear(48, 20, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def _reference(m: Two, x: torch.Tensor) -> torch.Tensor:
    h = torch.relu(torch.nn.functional.linear(x, m.a.weight, m.a.bias))
    return torch.nn.functional.linear(h, m.b.weight)


@needs_compiler
def test_live_linear_kernel_matches_torch(tmp_path, monkeypatch):
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    m = Two().eval()
    batch, seq = torch.export.Dim("batch", min=1, max=4), torch.export.Dim("seq", min=1, max=160)
    ep = torch.export.export(m, (torch.randn(2, 8, 40),), dynamic_shapes=({0: batch, 1: seq},),
                             strict=False)
    blob = bytes(to_edge_transform_and_lower(ep, partitioner=[]).to_executorch().buffer)
    path = ek.load_kernel()  # loaded once per process: a second copy would register twice
    assert path.is_file() and ek.load_kernel() == path
    monkeypatch.setenv("EDGEADAPT_CACHE", str(tmp_path / "cache"))  # a build from scratch
    built = ek.library_path()
    assert built.is_file() and built.parent.parent == tmp_path / "cache" / "kernels"
    assert built.name == path.name and ek.library_path() == built
    program = Runtime.get().load_program(blob)
    method = program.load_method("forward")
    for b, s in [(1, 1), (1, 2), (1, 63), (1, 64), (1, 65), (2, 64), (4, 160), (3, 1)]:
        x = torch.randn(b, s, 40)
        got = method.execute([x])[0]
        want = _reference(m, x)
        assert got.shape == want.shape == (b, s, 20)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (b, s)


@needs_compiler
def test_loading_the_kernel_keeps_the_process_floating_point_state():
    """The library must not switch on flush-to-zero (what -ffast-math's crtfastmath.o does at
    load): a float32 denormal survives arithmetic after loading, as before."""
    import numpy as np

    tiny = np.array([1e-39], dtype=np.float32)
    assert (tiny * np.float32(1.0))[0] != 0
    ek.load_kernel()
    assert (tiny * np.float32(1.0))[0] != 0
    assert (torch.tensor([1e-39]) * 1.0).item() != 0


def test_no_compiler_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEADAPT_CACHE", str(tmp_path))  # nothing built there
    monkeypatch.setenv("CXX", "")
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match=r"C\+\+ compiler"):
        ek.library_path()


def test_default_form_falls_back_without_a_compiler(monkeypatch, caplog):
    from edgeadapt.export.executorch import DEFAULT_LIVE_FORM, default_live_form
    from edgeadapt.runtime.backends import get_backend

    policy_form = get_backend("executorch").default_live_form
    assert DEFAULT_LIVE_FORM == "own-kernel" == policy_form  # torch-free twin
    if any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        assert default_live_form() == "own-kernel"
    monkeypatch.setenv("CXX", "")
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    assert default_live_form() == "weight-left"
    assert "weight-left instead of own-kernel" in caplog.text
