"""ONNX Runtime stores on a torch-free toy bundle (tests/runtime_toy.py): outputs after every
switch against an independent numpy forward with the same adapters, exact return to base,
typed errors with weights untouched, concurrency, no torch import, and a proof that the output
check catches stale prepacked weights."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cuda_standin import load_cuda_standin
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from runtime_toy import toy_forward, toy_weights, write_toy_bundle
from switching import device_hashes, runs_while_switching

from edgeadapt.errors import (
    AdapterFormatError,
    FingerprintMismatchError,
    SwitchError,
    TargetMismatchError,
    UnknownNameError,
)
from edgeadapt.format import (
    Adapter,
    AdapterEntry,
    LoraDelta,
    ShiraDelta,
    read_adapter,
    write_adapter,
)
from edgeadapt.format.fingerprint import weight_sha256
from edgeadapt.runtime import load

DIMS = [16, 24, 24, 20, 6]
LIVE = ["layers.0.weight", "layers.1.weight", "layers.2.weight"]  # layers.3 stays constant
ATOL = 1e-4


def _shira(w0, names, density, seed):
    rng = np.random.default_rng(seed)
    targets = {}
    for n in names:
        size = w0[n].size
        idx = np.sort(rng.choice(size, max(1, int(density * size)), replace=False))
        targets[n] = ShiraDelta(idx.astype(np.int64),
                                rng.standard_normal(idx.size).astype(np.float32) * 0.3)
    return Adapter("shira", targets, {n: w0[n].shape for n in names},
                   {n: weight_sha256(w0[n]) for n in names})


def _lora(w0, names, rank, seed):
    rng = np.random.default_rng(seed)
    targets = {n: LoraDelta(rng.standard_normal((rank, w0[n].shape[1])).astype(np.float32) * .2,
                            rng.standard_normal((w0[n].shape[0], rank)).astype(np.float32) * .2)
               for n in names}
    return Adapter("lora", targets, {n: w0[n].shape for n in names},
                   {n: weight_sha256(w0[n]) for n in names})


ADAPTERS = {
    "a": lambda w: _shira(w, ["layers.0.weight", "layers.1.weight"], 0.05, 1),
    "b": lambda w: _shira(w, ["layers.1.weight", "layers.2.weight"], 0.3, 2),
    "c": lambda w: _lora(w, ["layers.0.weight", "layers.2.weight"], 2, 3),
    "far": lambda w: _shira(w, ["layers.3.weight"], 0.1, 4),  # touches a constant weight
}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toy_bundle")
    w0 = toy_weights(DIMS, seed=0)
    (out / "adapters").mkdir()
    entries = {}
    for name, make in ADAPTERS.items():
        ad = make(w0)
        write_adapter(out / "adapters" / f"{name}.eadp", ad, value_dtype="float16")
        entries[name] = (f"adapters/{name}.eadp", ad.method)
    other = _shira(toy_weights(DIMS, seed=5), ["layers.0.weight"], 0.1, 9)  # another base
    write_adapter(out / "adapters" / "other.eadp", other)
    entries["other"] = ("adapters/other.eadp", "shira")
    write_toy_bundle(out, w0, LIVE, entries)
    return out


def reference_logits(bundle: Path, active: list[tuple[str, float]], x: np.ndarray):
    """Independent reference: the adapters read back from their files, applied densely in
    float64 to the original weights, through the numpy forward."""
    w = {n: v.astype(np.float64) for n, v in toy_weights(DIMS, seed=0).items()}
    for name, s in active:
        ad = read_adapter(bundle / "adapters" / f"{name}.eadp")
        for t, d in ad.targets.items():
            if isinstance(d, ShiraDelta):
                w[t].reshape(-1)[d.indices] += s * d.values
            else:
                w[t] += s * (d.B.astype(np.float64) @ d.A)
    return toy_forward(x, w)


def outputs_match(got: np.ndarray, want: np.ndarray) -> bool:
    """The parity check every switch test uses."""
    return got.shape == want.shape and bool(np.allclose(got, want, atol=ATOL, rtol=1e-4))


def buffer_hashes(rt) -> dict[str, str]:
    """sha256 of every live weight the runs read: the host buffers, and for the device store
    also its device buffers."""
    hashes = {n: hashlib.sha256(lw.array.tobytes()).hexdigest()
              for n, lw in rt.store.live_weights().items()}
    if hasattr(rt.store, "device_array"):
        hashes.update({f"device:{n}": h for n, h in device_hashes(rt).items()})
    return hashes


# live / repack: the CPU stores; device-*: the CUDA store's code on the CPU execution provider
# (tests/cuda_standin.py), with torch tensors or OrtValues as device buffers.
LIVE_KINDS = ["live", "device-torch", "device-ortvalue"]


def _load(bundle: Path, kind: str):
    if kind.startswith("device-"):
        return load_cuda_standin(bundle, torch_buffers=kind == "device-torch")
    return load(bundle, mode=kind, threads=1)


X = np.random.default_rng(42).standard_normal((8, DIMS[0])).astype(np.float32)
SEQUENCE = [["a"], ["b"], ["a", "b"], ["c"], ["a", "c"], None, ["b", "c", "a"], ["c"], None]


@pytest.mark.parametrize("mode", ["live", "repack", "device-torch", "device-ortvalue"])
def test_outputs_follow_every_switch(bundle, mode):
    rt = _load(bundle, mode)
    assert rt.mode == mode.split("-")[0].replace("device", "live")
    base = rt.run(x=X)
    assert outputs_match(base, reference_logits(bundle, [], X))
    for step in SEQUENCE:
        scales = None if step is None else [1.0 - 0.25 * i for i in range(len(step))]
        rt.switch(step, scales)
        active = [] if step is None else list(zip(step, scales, strict=True))
        assert rt.active == tuple(n for n, _ in active)
        got = rt.run(x=X)
        assert outputs_match(got, reference_logits(bundle, active, X)), (mode, step)
    assert np.array_equal(rt.run(x=X), base)  # back at base: bit-identical output


@pytest.mark.parametrize("mode", ["live", "repack"])
def test_returned_outputs_are_not_overwritten_by_later_runs(bundle, mode):
    """run() hands out ONNX Runtime's output buffer (no copy): a later run, a switch and a run
    after it must not change an array already returned."""
    rt = load(bundle, mode=mode, threads=1)
    first = rt.run(x=X)
    kept = first.copy()
    rt.run(x=-X)
    rt.switch("a")
    second = rt.run(x=X)
    assert np.array_equal(first, kept)
    assert outputs_match(first, reference_logits(bundle, [], X))
    assert outputs_match(second, reference_logits(bundle, [("a", 1.0)], X))
    assert not np.shares_memory(first, second)


def test_check_detects_stale_prepacked_weights(bundle):
    """Edit weights under a prepacked session without rebuilding: the check must fail."""
    rt = load(bundle, mode="repack", threads=1)
    rt.store.commit = lambda changes: None  # skip the rebuild that repack mode needs
    rt.switch(["a", "c"])
    stale = rt.run(x=X)
    assert not outputs_match(stale, reference_logits(bundle, [("a", 1.0), ("c", 1.0)], X))
    assert outputs_match(stale, reference_logits(bundle, [], X))  # still the base


@pytest.mark.parametrize("kind", ["device-torch", "device-ortvalue"])
def test_device_store_runs_read_the_device_buffers(bundle, kind):
    """With the commit to the device buffers skipped, the host mirrors change but the outputs
    must not: the device-store tests can fail when the commit is wrong."""
    rt = _load(bundle, kind)
    rt.store.commit = lambda changes: None
    rt.switch(["a", "c"])
    stale = rt.run(x=X)
    assert not outputs_match(stale, reference_logits(bundle, [("a", 1.0), ("c", 1.0)], X))
    assert outputs_match(stale, reference_logits(bundle, [], X))


@pytest.mark.parametrize("kind", ["device-torch", "device-ortvalue"])
def test_device_commit_failure_restores_device_buffers(bundle, kind):
    """A commit that dies after moving part of a switch to the device (a CUDA error, say):
    the switch is undone on the host and the device buffers are refreshed whole."""
    rt = _load(bundle, kind)
    rt.switch("a")
    before, out = buffer_hashes(rt), rt.run(x=X)
    real = rt.store.commit
    calls = []

    def dies_halfway(changes):
        calls.append(changes)
        if len(calls) == 1:
            first = sorted(changes)[0]
            real({first: changes[first]})  # one weight reaches the device, then an error
            raise RuntimeError("device error")
        real(changes)

    rt.store.commit = dies_halfway
    with pytest.raises(SwitchError, match="switch undone"):
        rt.switch(["b", "c"])
    assert calls[1] == {n: None for n in calls[0]}  # the whole-buffer refresh
    assert buffer_hashes(rt) == before and rt.active == ("a",)
    assert np.array_equal(rt.run(x=X), out)


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.one_of(st.none(), st.lists(st.sampled_from("abc"), min_size=1,
                                                     max_size=3, unique=True)),
                      min_size=1, max_size=6),
       scale=st.sampled_from([1.0, 0.5, -2.0]))
@pytest.mark.parametrize("kind", LIVE_KINDS)
def test_random_switches_return_to_base_bit_exact(bundle, kind, steps, scale):
    rt = _load(bundle, kind)
    before = buffer_hashes(rt)
    base = rt.run(x=X)
    for step in steps:
        rt.switch(step, None if step is None else [scale] * len(step))
    rt.switch(None)
    assert buffer_hashes(rt) == before
    assert np.array_equal(rt.run(x=X), base)


@pytest.mark.parametrize("kind", LIVE_KINDS)
def test_bad_switches_leave_weights_untouched(bundle, kind, tmp_path):
    rt = _load(bundle, kind)
    rt.switch(["a", "c"])
    before, out = buffer_hashes(rt), rt.run(x=X)
    with pytest.raises(UnknownNameError):
        rt.switch("nope")
    with pytest.raises(FingerprintMismatchError):
        rt.switch("other")
    with pytest.raises(TargetMismatchError):
        rt.switch(["b", "far"])
    # a corrupt file: a truncated copy registered under a new name
    good = (bundle / "adapters" / "b.eadp").read_bytes()
    (tmp_path / "b_trunc.eadp").write_bytes(good[: len(good) // 2])
    rt.manifest.adapters["broken"] = AdapterEntry(file=str(tmp_path / "b_trunc.eadp"),
                                                  method="shira")
    with pytest.raises(AdapterFormatError):
        rt.switch(["a", "broken"])
    assert buffer_hashes(rt) == before
    assert rt.active == ("a", "c")
    assert np.array_equal(rt.run(x=X), out)


@pytest.mark.parametrize("kind", LIVE_KINDS)
def test_concurrent_runs_see_whole_states(bundle, kind):
    rt = _load(bundle, kind)
    states = [None, ["a"], ["c"], ["a", "b"]]
    valid = []
    for s in states:
        rt.switch(s)
        valid.append(rt.run(x=X))
    errors, outputs = runs_while_switching(lambda: rt.run(x=X), rt.switch, states, readers=3,
                                           switches=200, seed=0, min_runs=20)
    assert not errors and len(outputs) >= 20
    assert all(any(np.array_equal(y, v) for v in valid) for y in outputs)


def test_auto_mode_reports_its_choice(bundle):
    assert load(bundle, mode="auto").mode == "live"
    rt = load(bundle, mode="auto", runs_per_switch=1e5, batch=64)
    assert rt.mode == "repack" and "batch 64" in rt.mode_reason
    rt.switch("a")
    assert rt.store.rebuilds == 1
    assert outputs_match(rt.run(x=X), reference_logits(bundle, [("a", 1.0)], X))


NO_TORCH = f"""
import sys
sys.modules['torch'] = None  # any `import torch` now raises ImportError
import numpy as np
import edgeadapt.runtime as r
rt = r.load(sys.argv[1], backend='onnxruntime', mode=sys.argv[2], threads=1)
x = np.ones((2, {DIMS[0]}), np.float32)
base = rt.run(x=x)
rt.switch(['a', 'c'], scales=[1.0, 0.5])
assert not np.array_equal(rt.run(x=x), base)
rt.switch(None)
assert np.array_equal(rt.run(x=x), base)
assert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules
               if sys.modules[m] is not None)
print('ok')
"""


@pytest.mark.parametrize("mode", ["live", "repack"])
def test_ort_path_imports_no_torch(bundle, mode):
    res = subprocess.run([sys.executable, "-c", NO_TORCH, str(bundle), mode],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
