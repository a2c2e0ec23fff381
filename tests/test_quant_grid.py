"""The quantization grids (edgeadapt/format/quant.py) against ONNX Runtime's own quantizers
(int4: MatMulNBits' symmetric block quantizer; int8: quantize_dynamic's per-channel weights),
and the code arithmetic of a switch: requantizing a delta, saturation, scale checks."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeadapt.errors import ConfigError
from edgeadapt.format.quant import INT4, INT8, grid

ort = pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("shape", [(64, 96), (33, 576)])
def test_int4_is_matmulnbits_grid(shape):
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    n, k = shape
    w = np.random.default_rng(n).standard_normal(shape).astype(np.float32)
    nb = k // 32
    packed = np.zeros((n, nb, 16), np.uint8)
    scales = np.zeros(n * nb, np.float32)
    quantize_matmul_4bits(packed, np.ascontiguousarray(w.T), scales, np.zeros(n * nb, np.uint8),
                          32, n, k, True)
    codes = np.stack([packed & 15, packed >> 4], -1).reshape(n, k).astype(np.int16) - 8
    q, s = INT4.quantize(w)
    assert np.array_equal(q, codes) and np.array_equal(s.reshape(-1), scales)


def test_int8_is_quantize_dynamic_grid(tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    n, k = 48, 45
    w = np.random.default_rng(2).standard_normal((n, k)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "B"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        [numpy_helper.from_array(np.ascontiguousarray(w.T), "B")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
              tmp_path / "a.onnx")
    quantize_dynamic(tmp_path / "a.onnx", tmp_path / "b.onnx", per_channel=True,
                     weight_type=QuantType.QInt8)
    inits = {i.name: numpy_helper.to_array(i)
             for i in onnx.load(tmp_path / "b.onnx").graph.initializer}
    q, s = INT8.quantize(w)
    assert np.array_equal(inits["B_quantized"].T, q)
    assert np.array_equal(inits["B_scale"], s[:, 0])


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
    INT8.check_scales(np.ones((4, 1), np.float32), (4, 9), "w")
    for bad in (np.zeros((4, 1), np.float32), np.full((4, 1), np.nan, np.float32),
                np.ones((4, 2), np.float32)):
        with pytest.raises(ConfigError, match="w: "):
            INT8.check_scales(bad, (4, 9), "w")
    assert grid("int4") is INT4
    with pytest.raises(ConfigError, match="fp32"):
        grid("int3")
