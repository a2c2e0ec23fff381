"""The quantized-base benchmark (edgeadapt/bench/quantized.py) on a one-block Llama (tiny
SmolLM2's architecture, cheaper to lower): every case runs after the parity checks (exact codes,
the kernel in the real graph against ONNX Runtime's own dequantization, ExecuTorch against its
PyTorch reference); the sizes and restore memory follow the precisions (int8 codes a byte each,
int4 two per byte where edgeadapt's ONNX Runtime kernel reads them).
One run for the module: ONNX Runtime at every precision; ExecuTorch at int4 only, in a second
run under ``make test-slow`` (its bundle and stock program are the lowerings that cost)."""

from __future__ import annotations

import importlib.util

import pytest
from llama_toy import one_block_llama

from edgeadapt.bench.quantized import BACKENDS, run, table
from edgeadapt.export.onnx import RTOL

EXECUTORCH = all(importlib.util.find_spec(m) for m in ("executorch", "torchao"))


def _run(tmp_path_factory, backends: tuple[str, ...]) -> dict:
    return run(one_block_llama(hidden=64), tmp_path_factory.mktemp("quant"), threads=1,
               repeats=2, switch_repeats=2, shapes=((1, 1), (2, 5)), backends=backends,
               executorch_precisions=("int4",))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return _run(tmp_path_factory, BACKENDS[:1])


@pytest.fixture(scope="module")
def et_report(tmp_path_factory):
    return _run(tmp_path_factory, BACKENDS)


def test_every_case_is_timed_after_parity(report):
    kernel = report["parity"]["kernel_vs_own_dequantization"]
    assert set(kernel) == {"int8", "int4", "int4-affine", "int4-affine-live8"}
    assert all(0 <= e <= RTOL for e in kernel.values())
    stock = {k: v for k, v in report["parity"].items()
             if " vs stock " in k and not k.startswith("executorch ")}
    assert set(stock) == {f"{p} {c} vs stock {s}" for p in ("int8", "int4")
                          for c in ("base", "hybrid") for s in ("1x1", "2x5")} | {
        f"{p} base vs stock {s}" for p in ("int4-affine", "int4-affine-live8")
        for s in ("1x1", "2x5")}  # no hybrid: no offsets
    # 0 where the live weights' node computes as stock MatMulNBits does (int8 activations, the
    # same float operations: int4 base at 1x1 on this one-block model)
    assert all(0 <= v["max_rel_error"] < 1 for v in stock.values())
    cases = {(r["shape"], r["case"]) for r in report["forward"]}
    assert {("1x1", "int4 stock"), ("2x5", "fp32 shira-fused"), ("1x1", "int8 hybrid")} <= cases
    assert {"int4 base / int4 stock", "int8 shira-fused / int8 base",
            "int4-affine-live8 base / int4-affine base"} <= {
        f"{r['num']} / {r['den']}" for r in report["ratios"]}
    assert "int4 base / int4 stock" in table(report)


def test_sizes_and_restore_memory_follow_the_precision(report):
    sizes, switch = report["sizes"], report["switch"]
    # int4 live codes two per byte where edgeadapt's kernel reads them (format/nibbles.py)
    assert sizes["fp32"]["live_bytes"] == 4 * sizes["int8"]["live_bytes"] \
        == 8 * sizes["int4"]["live_bytes"]
    # int4-affine-live8: the live weights int8 codes, the rest int4 as int4-affine's
    assert sizes["int4-affine-live8"]["live_bytes"] == sizes["int8"]["live_bytes"]
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


@pytest.mark.slow
@pytest.mark.skipif(not EXECUTORCH, reason="executorch or torchao missing")
def test_executorch_rows_are_timed_after_parity(et_report):
    """ExecuTorch's int4 base and fused held to PyTorch, timed in the same rounds as ONNX
    Runtime's cases beside ExecuTorch's stock int4 program; its switch and .pte sizes."""
    report = et_report
    from edgeadapt.export.executorch_quant import QUANT_MAX_REL_ERR, SPREAD_FACTOR, TOP1_MARGIN

    parity = report["parity"]["executorch_vs_pytorch"]["int4"]
    assert parity["tolerance"] is None and parity["spread_factor"] == SPREAD_FACTOR
    assert parity["top1_margin"] == TOP1_MARGIN
    for case in ("base", "shira-fused"):  # one block: the export check's tolerance holds
        assert 0 <= parity[case] <= QUANT_MAX_REL_ERR
        assert parity[case] <= parity[f"{case}_gate"]["max_rel_error"]
        assert parity[f"{case}_top1"] >= parity[f"{case}_gate"]["min_top1"]
    assert {f"executorch int4 base vs stock {s}" for s in ("1x1", "2x5")} <= set(
        report["parity"])
    cases = {(r["shape"], r["case"]) for r in report["forward"]}
    assert {(s, f"executorch int4 {c}") for s in ("1x1", "2x5")
            for c in ("base", "shira-fused", "stock")} <= cases
    ratios = {(r["shape"], f"{r['num']} / {r['den']}"): r["paired_median"]
              for r in report["ratios"]}
    want = {"executorch int4 shira-fused / executorch int4 base",
            "executorch int4 base / executorch int4 stock", "executorch int4 base / int4 base"}
    assert {(s, w) for s in ("1x1", "2x5") for w in want} <= set(ratios)
    assert all(v > 0 for v in ratios.values())
    assert "executorch int4 base / executorch int4 stock" in table(report)
    switch = report["switch"]["executorch int4"]
    assert switch["measured_over_floor"] > 0
    assert switch["restore_bytes"] == report["switch"]["int4"]["restore_bytes"]  # same codes
    sizes = report["sizes"]["executorch int4"]
    assert sizes["stock_pte_bytes"] > 0 and 0 < sizes["pte_bytes"] <= sizes["bundle_bytes"]
    # both hold int4 codes two per byte
    assert sizes["live_bytes"] == report["sizes"]["int4"]["live_bytes"]
