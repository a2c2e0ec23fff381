"""The quantized-base benchmark (edgeadapt/bench/quantized.py) on tiny SmolLM2: every case runs
after the parity checks (exact codes, the kernel in the real graph against ONNX Runtime's own
dequantization); the sizes and restore memory follow the precisions (codes are a byte each)."""

from __future__ import annotations

import pytest

from edgeadapt.bench.quantized import run, table
from edgeadapt.export.onnx import RTOL


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return run("tiny-smollm2", tmp_path_factory.mktemp("quant"), threads=1, repeats=2,
               switch_repeats=2, shapes=((1, 1), (2, 5)))


def test_every_case_is_timed_after_parity(report):
    kernel = report["parity"]["kernel_vs_own_dequantization"]
    assert set(kernel) == {"int8", "int4"} and all(0 <= e <= RTOL for e in kernel.values())
    stock = {k: v for k, v in report["parity"].items() if " vs stock " in k}
    assert set(stock) == {f"{p} {c} vs stock {s}" for p in ("int8", "int4")
                          for c in ("base", "hybrid") for s in ("1x1", "2x5")}
    assert all(0 < v["max_rel_error"] < 1 for v in stock.values())
    cases = {(r["shape"], r["case"]) for r in report["forward"]}
    assert {("1x1", "int4 stock"), ("2x5", "fp32 shira-fused"), ("1x1", "int8 hybrid")} <= cases
    assert {"int4 base / int4 stock", "int8 shira-fused / int8 base"} <= {
        f"{r['num']} / {r['den']}" for r in report["ratios"]}
    assert "int4 base / int4 stock" in table(report)


def test_sizes_and_restore_memory_follow_the_precision(report):
    sizes, switch = report["sizes"], report["switch"]
    assert sizes["fp32"]["live_bytes"] == 4 * sizes["int8"]["live_bytes"] \
        == 4 * sizes["int4"]["live_bytes"]
    assert sizes["int4"]["bundle_bytes"] < sizes["int8"]["bundle_bytes"] \
        < sizes["fp32"]["bundle_bytes"]
    # restore: an int64 position + the saved value (4 bytes fp32, a 1-byte code)
    positions = switch["fp32"]["restore_bytes"] / 12
    assert switch["int4"]["restore_bytes"] == switch["int8"]["restore_bytes"] == 9 * positions
    assert all(s["measured_over_floor"] > 0 for s in switch.values())
    assert all(("numpy_scatter" in s) == s["native_scatter"] for s in switch.values())


def test_lora_fused_on_codes_loses_most_of_a_small_delta(report):
    lora = report["lora_fused"]
    assert lora["fp32"]["delta_lost"] < 1e-3  # fp32: rounding only
    assert lora["int4"]["delta_lost"] > lora["int8"]["delta_lost"] > lora["fp32"]["delta_lost"]
