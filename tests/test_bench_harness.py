"""The benchmark harness on synthetic timings: percentiles, interleaving, ratios, the floor, the
JSON schema and the target checks, all against hand-computed values."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest

from edgeadapt.bench.floor import (
    CopyProbe,
    floor_ms,
    floor_ratios,
    measure_bandwidth,
    switch_traffic,
    touched_lines,
)
from edgeadapt.bench.schema import check_targets, validate_report
from edgeadapt.bench.timing import (
    Ratio,
    Stats,
    break_even_runs,
    combine_instances,
    instance_name,
    paired_ratios,
    ratio_of_medians,
)
from edgeadapt.errors import ConfigError
from edgeadapt.format.layout import backend_index
from edgeadapt.timer import flush_key, interleaved_order, time_calls, time_interleaved


def test_percentiles_by_hand():
    s = Stats.of([10, 9, 8, 7, 6, 5, 4, 3, 2, 1])
    # sorted 1..10; position q/100 * 9: p50 -> 4.5 -> 5.5; p90 -> 8.1 -> 9.1; p99 -> 8.91 -> 9.91
    assert s.p50_ms == pytest.approx(5.5)
    assert s.p90_ms == pytest.approx(9.1)
    assert s.p99_ms == pytest.approx(9.91)
    assert s.mean_ms == pytest.approx(5.5)
    assert s.n == 10
    with pytest.raises(ConfigError):
        Stats.of([])


def test_ratio_arithmetic_by_hand():
    a, b = [3.0, 8.0, 5.0], [1.0, 2.0, 4.0]
    assert ratio_of_medians(a, b) == pytest.approx(5.0 / 2.0)
    np.testing.assert_allclose(paired_ratios(a, b), [3.0, 4.0, 1.25])
    r = Ratio.of({"a": a, "b": b}, "a", "b")
    assert r.of_medians == pytest.approx(2.5)
    assert r.paired_median == pytest.approx(3.0)
    # sorted paired ratios [1.25, 3, 4]: p10 at position 0.2 -> 1.6; p90 at 1.8 -> 3.8
    assert r.paired_p10 == pytest.approx(1.6)
    assert r.paired_p90 == pytest.approx(3.8)
    with pytest.raises(ConfigError):
        paired_ratios([1.0, 2.0], [1.0])
    with pytest.raises(ConfigError):
        ratio_of_medians([1.0], [0.0])


def test_combine_instances_by_hand():
    """Two sessions per variant; session 1 of base is 2x slower throughout (a bad layout). The
    per-round geometric mean halves its weight: ratio sqrt((2*3)/(1*2)) per round, not 3/1."""
    samples = {"base#0": [1.0, 1.0], "base#1": [2.0, 2.0],
               "live#0": [2.0, 4.0], "live#1": [3.0, 3.0], "solo": [5.0, 6.0]}
    pooled, per_round = combine_instances(samples)
    assert sorted(pooled["base"]) == [1.0, 1.0, 2.0, 2.0]
    assert pooled["solo"] == [5.0, 6.0] and per_round["solo"] == pytest.approx([5.0, 6.0])
    assert per_round["base"] == pytest.approx([2 ** 0.5, 2 ** 0.5])
    assert per_round["live"] == pytest.approx([6 ** 0.5, 12 ** 0.5])
    r = Ratio.of(per_round, "live", "base")
    # per-round ratios sqrt(3), sqrt(6): their median is the mean of the two
    assert r.paired_median == pytest.approx((3 ** 0.5 + 6 ** 0.5) / 2)
    assert instance_name("live", 1) == "live#1"
    with pytest.raises(ConfigError):
        combine_instances({"a#0": [1.0, 2.0], "a#1": [1.0]})
    with pytest.raises(ConfigError):
        combine_instances({"a#0": [0.0]})


def test_interleaved_order_rotates():
    names = ["A", "B", "C"]
    assert [interleaved_order(names, r) for r in range(4)] == [
        ["A", "B", "C"], ["B", "C", "A"], ["C", "A", "B"], ["A", "B", "C"]]


class _FakeMachine:
    """A virtual clock: each case advances it by its cost times a drift that grows per call."""

    def __init__(self, drift_per_call: float):
        self.now_ns = 0
        self.calls: list[str] = []
        self.drift_per_call = drift_per_call

    def clock(self) -> int:
        return self.now_ns

    def case(self, name: str, cost_ms: float):
        def run():
            factor = 1.0 + self.drift_per_call * len(self.calls)
            self.calls.append(name)
            self.now_ns += int(round(cost_ms * factor * 1e6))
        return run


def test_time_interleaved_samples_and_order():
    m = _FakeMachine(drift_per_call=0.0)
    ticks = []
    out = time_interleaved({"A": m.case("A", 2.0), "B": m.case("B", 5.0)}, repeats=3,
                           warmup=2, clock=m.clock, progress=ticks.append)
    assert out == {"A": [2.0, 2.0, 2.0], "B": [5.0, 5.0, 5.0]}
    # two warm-up rounds in declaration order, then rounds rotated: AB, BA, AB
    assert m.calls == ["A", "B", "A", "B", "A", "B", "B", "A", "A", "B"]
    assert len(ticks) == 6


def test_time_interleaved_flushes_before_every_timed_call():
    """The flush runs right before every timed call, whatever the rotation put before it; it
    is timed apart (per case it preceded) and never counted in the case's sample."""
    m = _FakeMachine(drift_per_call=0.0)
    out = time_interleaved({"A": m.case("A", 2.0), "B": m.case("B", 5.0)}, repeats=2,
                           warmup=1, clock=m.clock, flush=m.case("copy", 7.0))
    assert out == {"A": [2.0, 2.0], "B": [5.0, 5.0], flush_key("A"): [7.0, 7.0],
                   flush_key("B"): [7.0, 7.0]}
    assert m.calls == ["A", "B", "copy", "A", "copy", "B", "copy", "B", "copy", "A"]


def test_time_interleaved_inner_mean():
    m = _FakeMachine(drift_per_call=0.0)
    out = time_interleaved({"A": m.case("A", 3.0)}, repeats=2, warmup=0, inner=4,
                           clock=m.clock)
    assert out == {"A": [3.0, 3.0]}
    assert len(m.calls) == 8


def test_time_calls_setup_warmup_and_units():
    """setup runs untimed before every call (warm-up included); samples are ms in call order."""
    m = _FakeMachine(drift_per_call=0.0)
    out = time_calls(m.case("A", 2.0), repeats=3, warmup=1, setup=m.case("s", 5.0),
                     clock=m.clock)
    assert out == [2.0, 2.0, 2.0]
    assert m.calls == ["s", "A"] * 4
    with pytest.raises(ConfigError):
        time_calls(lambda: None, repeats=0)


def test_backend_spellings():
    from edgeadapt.bench.backends import Target, parse_target, parse_targets

    assert parse_target("onnxruntime") == Target("onnxruntime", "cpu")
    assert parse_target("onnxruntime:cuda").key == "onnxruntime:cuda"
    assert parse_target("executorch", device="cuda") == Target("executorch", "cuda")
    assert parse_targets(["onnxruntime", " onnxruntime ", "executorch"]) == [
        Target("onnxruntime"), Target("executorch")]
    with pytest.raises(ConfigError, match="now spelt 'onnxruntime:cuda'"):
        parse_target("onnxruntime-cuda")
    with pytest.raises(ConfigError, match="unknown backend"):
        parse_target("tpu")
    with pytest.raises(ConfigError, match="unknown device"):
        parse_target("onnxruntime:npu")
    with pytest.raises(ConfigError, match="no backends"):
        parse_targets([" "])


def test_interleaving_cancels_drift_in_paired_ratios():
    # The machine slows down 5% per call; B costs exactly 2x A. Measured back to back (all A,
    # then all B) the ratio would be inflated by the drift; interleaved, each round's pair sees
    # nearly the same machine.
    m = _FakeMachine(drift_per_call=0.05)
    out = time_interleaved({"A": m.case("A", 1.0), "B": m.case("B", 2.0)}, repeats=40,
                           warmup=0, clock=m.clock)
    r = Ratio.of(out, "B", "A")
    assert r.paired_median == pytest.approx(2.0, rel=0.06)
    sequential_a = [1.0 * (1 + 0.05 * i) for i in range(40)]
    sequential_b = [2.0 * (1 + 0.05 * (40 + i)) for i in range(40)]
    assert ratio_of_medians(sequential_b, sequential_a) > 2.0 * 1.5


def test_time_interleaved_rejects_bad_counts():
    with pytest.raises(ConfigError):
        time_interleaved({"A": lambda: None}, repeats=0)


def test_break_even_by_hand():
    # repack costs 1000 ms more per switch and saves 0.2 ms per run -> 5000 runs per switch
    assert break_even_runs(10.2, 10.0, 2.0, 1002.0) == pytest.approx(5000.0)
    assert break_even_runs(10.0, 10.0, 2.0, 1002.0) == math.inf
    assert break_even_runs(11.0, 10.0, 5.0, 4.0) == 0.0


def test_backend_index_transposed():
    # (out=4, in=32): torch flat i = r * 32 + c -> transposed flat c * 4 + r
    idx = np.array([0, 1, 32, 127])
    np.testing.assert_array_equal(backend_index(idx, (4, 32), "as-is"), idx)
    np.testing.assert_array_equal(backend_index(idx, (4, 32), "transposed"),
                                  [0, 4, 1, 127])
    with pytest.raises(ConfigError):
        backend_index(idx, (4, 32), "diagonal")


def test_touched_lines_by_hand():
    # float32: 16 per 64-byte line. positions 0, 1 share line 0; 17 -> 1; 40 -> 2; 127 -> 7
    assert touched_lines(np.array([0, 1, 17, 40, 127]), 4) == 4
    assert touched_lines(np.array([], dtype=np.int64), 4) == 0
    assert touched_lines(np.array([0, 8]), 8) == 2
    # a buffer 32 bytes past a line (ExecuTorch's): element i sits at byte 32 + 4 i, so 0..7
    # share line 0, 8..23 line 1; positions 0 and 8 are two lines, 8 and 23 one
    assert touched_lines(np.array([0, 8]), 4, offset=32) == 2
    assert touched_lines(np.array([0, 8]), 4) == 1
    assert touched_lines(np.array([8, 23]), 4, offset=32) == 1
    assert touched_lines(np.array([8, 23]), 4) == 2


def test_switch_traffic_by_hand():
    shapes = {"w": (4, 32)}
    t = switch_traffic({"w": np.array([0, 1, 17])}, {"w": np.array([1, 40, 127])}, shapes)
    # union {0, 1, 17, 40, 127} -> lines {0, 1, 2, 7}: 4 lines read + written = 512 bytes
    # streams: 6 indices * 8 + 3 new values * 4 + 5 saved base values * 4 = 80 bytes
    assert (t.lines, t.line_bytes, t.stream_bytes, t.total_bytes, t.positions) == (
        4, 512, 80, 592, 5)
    # the layout matters: torch positions 0 and 32 are two lines as-is, one line transposed
    as_is = switch_traffic({"w": np.array([0])}, {"w": np.array([32])}, shapes)
    trans = switch_traffic({"w": np.array([0])}, {"w": np.array([32])}, shapes,
                           layouts={"w": "transposed"})
    assert (as_is.lines, trans.lines) == (2, 1)
    # the buffer's real address: 32 bytes past a line, positions 0 and 8 fall on two lines
    assert switch_traffic({}, {"w": np.array([0, 8])}, shapes, offsets={"w": 32}).lines == 2
    assert switch_traffic({}, {"w": np.array([0, 8])}, shapes).lines == 1
    # switching from the base touches only the new adapter's positions
    base = switch_traffic({}, {"w": np.array([0, 32])}, shapes)
    assert base.stream_bytes == 2 * 8 + 2 * 4 + 2 * 4


def test_floor_ms_by_hand():
    t = switch_traffic({}, {"w": np.array([0])}, {"w": (1, 16)})  # 1 line + 16 stream bytes
    assert floor_ms(t, 144e3) == pytest.approx(1.0)
    with pytest.raises(ConfigError):
        floor_ms(t, 0.0)


def test_measure_bandwidth_on_a_fake_clock(monkeypatch):
    """Each timed interval holds one copy of the whole array; the bandwidth is read + write
    bytes over the fastest copy: copies of 4, 2 and 3 ms of 4096 bytes -> 2 * 4096 / 2 ms."""
    import edgeadapt.bench.floor as floor

    events: list[str] = []
    ticks = iter([0.0, 0.004, 1.0, 1.002, 2.0, 2.003])

    def clock() -> float:
        events.append("clock")
        return next(ticks)

    real_copyto = np.copyto

    def copyto(dst, src):
        assert dst.nbytes == src.nbytes == 4096
        events.append("copy")
        real_copyto(dst, src)

    monkeypatch.setattr(floor.np, "copyto", copyto)
    bw = measure_bandwidth(nbytes=4096, repeats=3, clock=clock)
    assert bw == pytest.approx(2 * 4096 / 0.002)
    # one untimed copy faults the pages in, then clock / copy / clock per repeat
    assert events == ["copy"] + ["clock", "copy", "clock"] * 3


def test_floor_ratios_by_hand():
    """Copies and switches of the same rounds: 1 line + 16 stream bytes = 144 bytes."""
    t = switch_traffic({}, {"w": np.array([0])}, {"w": (1, 16)})
    probe = CopyProbe(nbytes=1 << 12)
    bw = probe.bandwidth([2 * 4096 / 144e3 * 1e3, 2 * 4096 / 288e3 * 1e3])  # 144, 288 kB/s
    np.testing.assert_allclose(bw, [144e3, 288e3])
    r = floor_ratios([3.0, 1.0], bw, t)  # per-round floors 1.0 and 0.5 ms
    assert r["floor_ms"] == pytest.approx(144 / 216e3 * 1e3)  # median bandwidth 216 kB/s
    assert r["floor_ms_peak"] == pytest.approx(0.5)
    assert r["measured_over_floor"] == pytest.approx((3.0 + 2.0) / 2)  # median of 3/1, 1/0.5
    assert r["measured_over_floor_peak"] == pytest.approx(2.0 / 0.5)
    assert r["bandwidth_GBps_peak"] == pytest.approx(288e3 / 1e9)
    probe()
    assert np.array_equal(probe.dst, probe.src)
    with pytest.raises(ConfigError):
        floor_ratios([1.0], bw, t)
    with pytest.raises(ConfigError):
        probe.bandwidth([0.0])


def test_check_targets_uses_the_paired_floor_ratio():
    rep = _report()
    rep["floor"]["measured_over_floor"] = {"onnxruntime:cpu": 1.7}
    rows = {(r["target"], r["backend"]): r for r in check_targets(rep)}
    assert rows[("shira switch/floor", "onnxruntime")]["value"] == 1.7
    assert rows[("shira switch/floor", "onnxruntime")]["status"] == "miss"


def _report() -> dict:
    fwd = []
    for (b, s), times in {(1, 1): (10.0, 10.1, 12.0), (1, 64): (20.0, 20.2, 30.0),
                          (8, 64): (40.0, 42.0, 44.0)}.items():
        for variant, t in zip(("base", "shira-live", "sira-unfused"), times, strict=True):
            fwd.append({"backend": "onnxruntime", "device": "cpu", "variant": variant, "batch": b,
                        "seq": s, "p50_ms": t, "p90_ms": t * 1.1, "p99_ms": t * 1.2})
    sw = [{"backend": "onnxruntime", "device": "cpu", "method": m, "mode": mode, "p50_ms": t}
          for m, mode, t in (("shira", "live", 2.0), ("lora-fuse", "live", 30.0),
                             ("reload", "repack", 300.0))]
    return {"model": "synthetic", "device": "test cpu", "forward": fwd, "switch": sw,
            "floor": {"shira_switch_ms": 1.5}}


def test_schema_accepts_valid_and_survives_json():
    rep = _report()
    validate_report(rep)
    validate_report(json.loads(json.dumps(rep)))


@pytest.mark.parametrize("mutate", [
    lambda r: r.pop("model"),
    lambda r: r.pop("floor"),
    lambda r: r["forward"][0].pop("p90_ms"),
    lambda r: r["forward"][0].update(variant="shira-magic"),
    lambda r: r["forward"][0].update(batch=0),
    lambda r: r["forward"][0].update(p50_ms=float("nan")),
    lambda r: r["forward"][0].update(p50_ms=100.0),  # p50 > p90
    lambda r: r["switch"][0].update(method="teleport"),
    lambda r: r["switch"][0].pop("mode"),
    lambda r: r["switch"][0].update(mode="turbo"),
    lambda r: r["switch"][0].update(backend="tpu"),
    lambda r: r["forward"][0].update(backend="onnxruntime-gpu"),
    lambda r: r["forward"][0].update(backend="onnxruntime-cpu"),  # the old spelling
    lambda r: r["forward"][0].update(device="tpu"),
    lambda r: r["switch"][0].pop("device"),
    lambda r: r["floor"].update(shira_switch_ms="fast"),
])
def test_schema_rejects_broken(mutate):
    rep = copy.deepcopy(_report())
    mutate(rep)
    with pytest.raises(ConfigError):
        validate_report(rep)


def test_check_targets_by_hand():
    rows = {(r["target"], r["backend"]): r for r in check_targets(_report())}
    cpu = "onnxruntime"
    assert rows[("shira-live/base 1x1", cpu)]["value"] == pytest.approx(1.01)
    assert rows[("shira-live/base 1x1", cpu)]["status"] == "pass"
    assert rows[("shira-live/base 8x64", cpu)]["value"] == pytest.approx(1.05)
    assert rows[("shira-live/base 8x64", cpu)]["status"] == "miss"
    assert rows[("lora-fuse/shira switch", cpu)]["value"] == pytest.approx(15.0)
    assert rows[("lora-fuse/shira switch", cpu)]["status"] == "pass"
    assert rows[("shira switch/floor", cpu)]["value"] == pytest.approx(2.0 / 1.5)
    assert rows[("shira switch/floor", cpu)]["status"] == "pass"
    assert rows[("reload/shira switch", cpu)]["value"] == pytest.approx(150.0)
    assert rows[("reload/shira switch", cpu)]["status"] == "miss"
    assert rows[("sira-unfused/base 1x1", cpu)]["value"] == pytest.approx(1.2)
    assert rows[("sira-unfused/base 1x64", cpu)]["status"] == "miss"  # 30 / 20 = 1.5


def test_check_targets_prefers_paired_ratio_and_flags_missing():
    rep = _report()
    rep["forward"][1]["ratio_vs_base"] = 1.5  # shira-live 1x1: paired median overrides p50s
    rep["switch"] = [r for r in rep["switch"] if r["method"] != "reload"]
    rows = {(r["target"], r["backend"]): r for r in check_targets(rep)}
    assert rows[("shira-live/base 1x1", "onnxruntime")]["value"] == 1.5
    assert rows[("reload/shira switch", "onnxruntime")]["status"] == "not measured"


def test_check_targets_uses_same_round_switch_ratios():
    """Rows carrying ratio_vs_shira (paired with the SHiRA switch of the same rounds) are
    judged by it, not by the ratio of p50s from different series (30 / 2 = 15, 300 / 2 =
    150)."""
    rep = _report()
    for r in rep["switch"]:
        r["ratio_vs_shira"] = {"shira": 1.0, "lora-fuse": 9.0, "reload": 233.0}[r["method"]]
    rows = {(r["target"], r["backend"]): r for r in check_targets(rep)}
    assert rows[("lora-fuse/shira switch", "onnxruntime")]["value"] == 9.0
    assert rows[("lora-fuse/shira switch", "onnxruntime")]["status"] == "miss"
    assert rows[("reload/shira switch", "onnxruntime")]["value"] == 233.0
    assert rows[("reload/shira switch", "onnxruntime")]["status"] == "pass"


def test_switch_row_ratio_is_paired_with_the_same_rounds():
    """reload 300, 400, 1000 ms against SHiRA switches of 1, 2, 4 ms in the same rounds:
    per-round ratios 300, 200, 250 -> median 250 (the ratio of p50s would be 400 / 2 = 200)."""
    from edgeadapt.bench.backends import Target
    from edgeadapt.bench.switch import switch_row

    row = switch_row(Target("onnxruntime", "cpu"), "reload", "repack",
                     {"shira": [1.0, 2.0, 4.0], "reload": [300.0, 400.0, 1000.0]}, "reload")
    assert row["ratio_vs_shira"] == pytest.approx(250.0)
    # sorted ratios 200, 250, 300: p10 at position 0.2 -> 210, p90 at 1.8 -> 290
    assert row["ratio_vs_shira_p10"] == pytest.approx(210.0)
    assert row["ratio_vs_shira_p90"] == pytest.approx(290.0)
    assert row["p50_ms"] == 400.0 and row["shira_same_rounds_p50_ms"] == 2.0
    assert (row["method"], row["mode"], row["n"]) == ("reload", "repack", 3)


def test_table_prints_n_and_marks_p99_from_few_samples():
    from edgeadapt.bench.report import table

    rep = _report()
    for r in rep["forward"]:
        r["n"] = 100 if r["variant"] == "base" else 12
    lines = table(rep).splitlines()
    base = next(x for x in lines if " base " in x and "1x1" in x)
    live = next(x for x in lines if "shira-live" in x and "1x1" in x)
    assert base.split()[3] == "100" and base.split()[6] == "12.000"
    assert live.split()[3] == "12" and live.split()[6] == "12.120*"
    assert any(x.startswith("* p99 from n < 100") for x in lines)


def test_policy_thresholds_from_break_even(tmp_path):
    """2x the smallest break-even per batch class, inf where repack never wins; CUDA rows and
    unmeasured ones left out; written through the runtime's policy file format."""
    from edgeadapt.bench.policy import thresholds, write_policy
    from edgeadapt.runtime.policy import read_thresholds

    def row(device, batch, seq, runs, never=False):
        return {"backend": "onnxruntime", "device": device, "batch": batch, "seq": seq,
                "runs_per_switch": runs, "repack_never_wins": never}

    rep = {"command": "edgeadapt bench b/", "device": "test cpu",
           "live_form_by_backend": {"onnxruntime:cpu": "blocked32",
                                    "onnxruntime:cuda": "blocked32"},
           "break_even": [row("cpu", 1, 1, None, never=True), row("cpu", 8, 64, 40.0),
                          row("cpu", 8, 128, 34.0), row("cpu", 4, 64, None),
                          row("cuda", 1, 1, 5.0)]}
    assert thresholds(rep) == {("onnxruntime", "blocked32"): {1: math.inf, 8: 68.0}}
    path = write_policy(tmp_path / "policy.json", rep)
    assert read_thresholds(path)[("onnxruntime", "blocked32")] == {1: math.inf, 8: 68.0}
    with pytest.raises(ConfigError, match="no live-vs-repack break-even"):
        write_policy(tmp_path / "p2.json", {**rep, "break_even": []})


def test_stopwatch_reads_seconds_since_start():
    from edgeadapt.timer import stopwatch

    ticks = iter([10.0, 12.5, 13.0])
    elapsed = stopwatch(clock=lambda: next(ticks))
    assert elapsed() == 2.5 and elapsed() == 3.0
