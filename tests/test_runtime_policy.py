"""The auto policy's data file (runtime/policy.json) and its writer, ``write_thresholds``, which
the bench calls: every shipped row has its source, a write replaces only the rows it names and
is atomic, and bad thresholds are refused. Torch-free."""

from __future__ import annotations

import json
import math

import pytest

from edgeadapt.errors import ConfigError
from edgeadapt.runtime import choose_mode, policy


def test_shipped_rows_carry_their_source():
    doc = json.loads(policy.POLICY_FILE.read_text())
    assert doc["rows"] and all(r["source"].startswith("docs/bench.md") for r in doc["rows"])
    assert policy.read_thresholds() == policy.REPACK_RUNS_PER_SWITCH
    assert policy.REPACK_RUNS_PER_SWITCH[("onnxruntime", "blocked32")] == {1: math.inf, 8: 68.0}


def test_write_thresholds_replaces_only_its_rows(tmp_path):
    path = tmp_path / "policy.json"
    out = policy.write_thresholds(path, {("onnxruntime", "blocked32"): {1: math.inf, 8: 50.0},
                                         ("onnxruntime", "new-form"): {1: 10.0}},
                                  "bench run 99")
    assert out == path and [p.name for p in tmp_path.iterdir()] == ["policy.json"]  # no temp
    table = policy.read_thresholds(path)
    assert table[("onnxruntime", "blocked32")] == {1: math.inf, 8: 50.0}
    assert table[("onnxruntime", "new-form")] == {1: 10.0}
    shipped = policy.read_thresholds()
    kept = [k for k in shipped if k != ("onnxruntime", "blocked32")]
    assert {k: table[k] for k in kept} == {k: shipped[k] for k in kept}
    rows = {(r["backend"], r["live_form"]): r for r in json.loads(path.read_text())["rows"]}
    assert rows[("onnxruntime", "blocked32")]["runs_per_switch"] == {"1": None, "8": 50.0}
    assert rows[("onnxruntime", "blocked32")]["source"] == "bench run 99"
    assert rows[("executorch", "linear")]["source"].startswith("docs/bench.md")
    # a second write starts from the file it updates, not from the shipped one
    policy.write_thresholds(path, {("executorch", "linear"): {1: 7.0, 8: 3.0}}, "run 100")
    table = policy.read_thresholds(path)
    assert table[("onnxruntime", "blocked32")][8] == 50.0
    assert table[("executorch", "linear")] == {1: 7.0, 8: 3.0}
    assert shipped == policy.REPACK_RUNS_PER_SWITCH  # another file: this process unchanged


@pytest.mark.parametrize("row", [{}, {0: 5.0}, {1: -1.0}, {1: float("nan")}])
def test_write_thresholds_refuses_bad_rows(tmp_path, row):
    with pytest.raises(ConfigError, match="write_thresholds"):
        policy.write_thresholds(tmp_path / "p.json", {("onnxruntime", "blocked32"): row}, "x")
    assert not (tmp_path / "p.json").exists()


def test_a_broken_policy_file_is_a_config_error(tmp_path):
    (tmp_path / "p.json").write_text('{"rows": [{"backend": "onnxruntime"}]}')
    with pytest.raises(ConfigError, match="p.json"):
        policy.read_thresholds(tmp_path / "p.json")


def test_batch_classes_pick_the_largest_at_or_below(monkeypatch):
    monkeypatch.setitem(policy.REPACK_RUNS_PER_SWITCH, ("onnxruntime", "three"),
                        {1: 100.0, 4: 50.0, 16: 10.0})
    assert [choose_mode(60, b, "onnxruntime", "three")[0] for b in (1, 3, 4, 15, 16, 64)] == \
        ["live", "live", "repack", "repack", "repack", "repack"]
    assert [choose_mode(20, b, "onnxruntime", "three")[0] for b in (4, 15, 16)] == \
        ["live", "live", "repack"]
