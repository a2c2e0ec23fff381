"""Round trips through the .eadp file: bit-exact positions, values exact in the stored dtype.

References are independent of the codec under test: numpy's float16 cast, ml_dtypes' bfloat16
cast, the indices the test generated, and the safetensors package reading our container.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from edgeadapt.format import (
    Adapter,
    LoraDelta,
    ShiraDelta,
    SiraBranch,
    read_adapter,
    weight_sha256,
    write_adapter,
)

SHA = "0123456789abcdef" * 4
FAST = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def stored(values: np.ndarray, value_dtype: str) -> np.ndarray:
    """Independent reference of what a value becomes in storage, widened to float32."""
    kind = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32}
    return np.asarray(values, dtype=np.float32).astype(kind[value_dtype]).astype(np.float32)


@st.composite
def shira_cases(draw):
    out_f = draw(st.integers(1, 40))
    in_f = draw(st.integers(1, 40))
    numel = out_f * in_f
    mode = draw(st.sampled_from(["random", "empty", "dense", "last", "first", "empty_rows"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if mode == "random":
        k = draw(st.integers(0, numel))
        idx = rng.choice(numel, size=k, replace=False)
    elif mode == "empty":
        idx = np.zeros(0, dtype=np.int64)
    elif mode == "dense":
        idx = np.arange(numel)
    elif mode == "last":
        idx = np.array([numel - 1])
    elif mode == "first":
        idx = np.array([0])
    else:  # only a few rows populated, the others empty
        rows = rng.choice(out_f, size=max(1, out_f // 4), replace=False)
        idx = (rows[:, None] * in_f + np.arange(in_f)[None, :]).reshape(-1)
    idx = np.sort(np.asarray(idx, dtype=np.int64))
    values = (rng.standard_normal(idx.size) * draw(st.sampled_from([1e-3, 1.0, 100.0])))
    value_dtype = draw(st.sampled_from(["float16", "bfloat16", "float32"]))
    return out_f, in_f, idx, values.astype(np.float32), value_dtype


@FAST
@given(case=shira_cases())
def test_shira_round_trip(tmp_path, case):
    out_f, in_f, idx, values, value_dtype = case
    name = "model.layers.0.self_attn.q_proj.weight"
    a = Adapter("shira", {name: ShiraDelta(idx, values)}, {name: (out_f, in_f)}, {name: SHA},
                scale=0.5, meta={"task": "t"})
    path = write_adapter(tmp_path / "a.eadp", a, value_dtype)
    b = read_adapter(path)
    d = b.targets[name]
    assert d.indices.dtype == np.int64 and np.array_equal(d.indices, idx)
    assert d.values.dtype == np.float32
    np.testing.assert_array_equal(d.values, stored(values, value_dtype))
    assert b.method == "shira" and b.scale == 0.5 and b.meta == {"task": "t"}
    assert b.shapes == {name: (out_f, in_f)} and b.weight_sha256 == {name: SHA}


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(gaps=st.lists(st.integers(0, 2**33), min_size=1, max_size=30),
       seed=st.integers(0, 2**16))
def test_shira_large_gaps_hit_escapes(tmp_path, gaps, seed):
    """Gaps of every size, up to beyond 2**32 (u64 escapes), on a huge sparse weight."""
    idx = np.cumsum(np.asarray(gaps, dtype=np.int64) + 1) - 1
    out_f, in_f = 1 << 18, 1 << 18  # 2**36 elements: positions never need a dense array
    values = np.random.default_rng(seed).standard_normal(idx.size).astype(np.float32)
    a = Adapter("shira", {"w": ShiraDelta(idx, values)}, {"w": (out_f, in_f)}, {"w": SHA})
    b = read_adapter(write_adapter(tmp_path / "g.eadp", a, "float32"))
    assert np.array_equal(b.targets["w"].indices, idx)
    np.testing.assert_array_equal(b.targets["w"].values, values)


def test_escape_dtypes_are_chosen_by_size(tmp_path):
    """A gap of 2**32 needs a U64 escape; tiny gaps stay U8 with no escapes (read back with
    the independent safetensors reader)."""
    idx = np.array([0, 1, 2, 2 + 2**32 + 1])
    a = Adapter("shira", {"w": ShiraDelta(idx, np.ones(4, np.float32))}, {"w": (1 << 20, 1 << 20)},
                {"w": SHA})
    path = write_adapter(tmp_path / "e.eadp", a)
    with safe_open(str(path), "np") as f:
        gaps, esc = f.get_tensor("w/gaps"), f.get_tensor("w/escapes")
    assert gaps.dtype == np.uint8 and esc.dtype == np.uint64
    assert gaps.tolist() == [0, 0, 0, 255] and esc.tolist() == [2**32]


@pytest.mark.parametrize("value_dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("method", ["lora", "sora"])
def test_lora_round_trip(tmp_path, method, value_dtype):
    rng = np.random.default_rng(1)
    targets, shapes = {}, {}
    for i, (o, n, r) in enumerate([(8, 12, 3), (5, 12, 1), (7, 9, 0)]):  # rank 0: all pruned
        targets[f"l{i}.weight"] = LoraDelta(rng.standard_normal((r, n)).astype(np.float32),
                                            rng.standard_normal((o, r)).astype(np.float32))
        shapes[f"l{i}.weight"] = (o, n)
    a = Adapter(method, targets, shapes, {k: SHA for k in targets}, meta={"ranks_kept": [3, 1, 0]})
    b = read_adapter(write_adapter(tmp_path / "l.eadp", a, value_dtype))
    assert b.method == method and b.meta == {"ranks_kept": [3, 1, 0]}
    for k, d in targets.items():
        np.testing.assert_array_equal(b.targets[k].A, stored(d.A, value_dtype))
        np.testing.assert_array_equal(b.targets[k].B, stored(d.B, value_dtype))


@pytest.mark.parametrize("value_dtype", ["float16", "bfloat16", "float32"])
def test_sira_round_trip(tmp_path, value_dtype):
    rng = np.random.default_rng(2)
    e, r, o, n = 4, 2, 6, 10
    br = SiraBranch(rng.standard_normal((e, n)).astype(np.float32),
                    rng.standard_normal((e, r, n)).astype(np.float32),
                    rng.standard_normal((e, o, r)).astype(np.float32), top_k=2,
                    capacity_factor=1.25)
    a = Adapter("sira", {"w": br}, {"w": (o, n)}, {"w": SHA})
    b = read_adapter(write_adapter(tmp_path / "s.eadp", a, value_dtype)).targets["w"]
    assert (b.top_k, b.capacity_factor, b.num_experts) == (2, 1.25, 4)
    for part in ("router", "A", "B"):
        np.testing.assert_array_equal(getattr(b, part), stored(getattr(br, part), value_dtype))


def test_fp16_values_round_trip_bit_exact(tmp_path):
    """Values already in fp16 come back bit for bit (every finite fp16 bit pattern)."""
    bits = np.arange(0, 2**16, dtype=np.uint16)
    vals = bits.view(np.float16)
    vals = vals[np.isfinite(vals)]
    idx = np.arange(vals.size)
    a = Adapter("shira", {"w": ShiraDelta(idx, vals)}, {"w": (vals.size, 1)}, {"w": SHA})
    b = read_adapter(write_adapter(tmp_path / "h.eadp", a, "float16"))
    assert np.array_equal(b.targets["w"].values.astype(np.float16).view(np.uint16),
                          vals.view(np.uint16))


def test_bfloat16_rounding_matches_ml_dtypes(tmp_path):
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.standard_normal(5000) * 10.0 ** rng.integers(-30, 30, 5000),
                        [0.0, -0.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 3e38, -3e38]]).astype(np.float32)
    a = Adapter("shira", {"w": ShiraDelta(np.arange(x.size), x)}, {"w": (x.size, 1)}, {"w": SHA})
    got = read_adapter(write_adapter(tmp_path / "b.eadp", a, "bfloat16")).targets["w"].values
    ref = x.astype(ml_dtypes.bfloat16).astype(np.float32)
    assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))


def test_container_is_readable_by_safetensors(tmp_path):
    idx = np.array([3, 9, 10])
    a = Adapter("shira", {"w": ShiraDelta(idx, np.array([1, 2, 3], np.float32))}, {"w": (4, 4)},
                {"w": SHA})
    path = write_adapter(tmp_path / "c.eadp", a, "float16")
    with safe_open(str(path), "np") as f:
        md = f.metadata()
        assert f.get_tensor("w/values").tolist() == [1.0, 2.0, 3.0]
    assert md["format"] == "edgeadapt-adapter" and md["version"] == "1"
    assert json.loads(md["targets"]) == [{"name": "w", "shape": [4, 4], "sha256": SHA, "nnz": 3}]


def test_weight_sha256_ties_to_fp32_bytes():
    w = np.arange(6, dtype=np.float64).reshape(2, 3)
    assert weight_sha256(w) == weight_sha256(w.astype(np.float32))
    assert weight_sha256(w) != weight_sha256(w.T.copy())


def test_write_is_atomic_and_leaves_no_temp(tmp_path):
    a = Adapter("shira", {"w": ShiraDelta(np.array([1]), np.array([1.0], np.float32))},
                {"w": (2, 2)}, {"w": SHA})
    path = tmp_path / "x.eadp"
    write_adapter(path, a)
    first = path.read_bytes()
    bad = Adapter("shira", {"w": ShiraDelta(np.array([1]), np.array([np.nan], np.float32))},
                  {"w": (2, 2)}, {"w": SHA})
    from edgeadapt.errors import AdapterFormatError

    with pytest.raises(AdapterFormatError, match="non-finite"):
        write_adapter(path, bad)
    with pytest.raises(AdapterFormatError, match="overflow"):
        write_adapter(path, Adapter("shira", {"w": ShiraDelta(np.array([1]),
                                                              np.array([1e6], np.float32))},
                                    {"w": (2, 2)}, {"w": SHA}), "float16")
    assert path.read_bytes() == first
    assert os.listdir(tmp_path) == ["x.eadp"]


def test_format_imports_without_torch(tmp_path):
    """edgeadapt.format must work in a process where importing torch fails."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "import edgeadapt.format as f\n"
        "a = f.Adapter('shira', {'w': f.ShiraDelta(np.array([0, 5]), np.ones(2, np.float32))},"
        " {'w': (2, 3)}, {'w': 'a' * 64})\n"
        f"p = f.write_adapter({str(tmp_path / 't.eadp')!r}, a)\n"
        "assert f.read_adapter(p).targets['w'].indices.tolist() == [0, 5]\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
