"""The quantization grids (edgeadapt/format/quant.py) against ONNX Runtime's own quantizer
(MatMulNBits' symmetric block quantizer, 4 and 8 bits), and the code arithmetic of a switch:
requantizing a delta, saturation, scale checks."""

from __future__ import annotations

import numpy as np
import pytest

from edgeadapt.errors import ConfigError
from edgeadapt.format.quant import INT4, INT8, grid

ort = pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("coarse", [False, True])
@pytest.mark.parametrize("shape", [(64, 96), (33, 576)])
@pytest.mark.parametrize("bits", [4, 8])
def test_grids_are_matmulnbits_grids(shape, bits, coarse):
    """Bit for bit, also on coarse values (multiples of 1/64, as weights dequantized from a
    GGUF are): blocks whose max and min have one magnitude, quotients on exact ties."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    n, k = shape
    w = np.random.default_rng(n + bits).standard_normal(shape).astype(np.float32)
    if coarse:
        w = np.round(w * 8) / 64
    nb = k // 32
    packed = np.zeros((n, nb, 4 * bits), np.uint8)
    scales = np.zeros(n * nb, np.float32)
    quantize = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    quantize(packed, np.ascontiguousarray(w.T), scales, np.zeros(n * nb, np.uint8), 32, n, k,
             True)
    if bits == 4:
        codes = np.stack([packed & 15, packed >> 4], -1).reshape(n, k).astype(np.int16) - 8
    else:
        codes = packed.reshape(n, k).astype(np.int16) - 128
    q, s = (INT4 if bits == 4 else INT8).quantize(w)
    assert np.array_equal(q, codes) and np.array_equal(s.reshape(-1), scales)


def test_requantize_adds_on_the_grid_and_reports_saturation():
    w = np.array([[0.5, -1.0, 0.25, 0.0] * 8], np.float32)  # one int4 group
    q, s = INT4.quantize(w)
    step = float(s[0, 0])  # -1.0 / -8 = 0.125
    assert step == 0.125 and q[0, 1] == -8 and q[0, 0] == 4
    idx = np.array([0, 1, 2], np.int64)
    per = INT4.scale_at(s, w.shape, idx)
    new, sat = INT4.requantize(q.reshape(-1)[idx], per,
                               np.array([2 * step, -step, 0.4 * step], np.float32))
    assert new.tolist() == [6, -8, 2] and sat.tolist() == [False, True, False]


def test_zero_groups_get_a_usable_scale():
    w = np.zeros((2, 64), np.float32)
    w[0, :32] = np.linspace(-1, 1, 32)
    q, s = INT4.quantize(w)
    assert (s != 0).all() and (q[1] == 0).all() and (q[0, 32:] == 0).all()
    np.testing.assert_array_equal(INT4.dequantize(q, s)[1], 0)


def test_scale_checks_and_names():
    with pytest.raises(ConfigError, match="in_features % 32"):
        INT4.scales(np.ones((2, 40), np.float32))
    INT8.check_scales(np.ones((4, 2), np.float32), (4, 64), "w")
    for bad in (np.zeros((4, 2), np.float32), np.full((4, 2), np.nan, np.float32),
                np.ones((4, 1), np.float32)):
        with pytest.raises(ConfigError, match="w: "):
            INT8.check_scales(bad, (4, 64), "w")
    assert grid("int4") is INT4
    with pytest.raises(ConfigError, match="fp32"):
        grid("int3")
