"""ExecuTorch weight store: parity with PyTorch, in-place edits through get_attribute views,
repack mode, and the stale-output failure the checks must catch.

Reference everywhere: the original PyTorch model with the same edit applied by
``edgeadapt.adapters.apply_adapter_torch`` (independent of the ExecuTorch path). Exports use a
one-block Llama (seconds to lower on a quiet machine) exported once per session by
:func:`shared_bundle`.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("executorch")

from llama_toy import one_block_llama  # noqa: E402  (also imported from here by others)

from edgeadapt.adapters import apply_adapter_torch  # noqa: E402
from edgeadapt.errors import BundleError, ConfigError  # noqa: E402
from edgeadapt.export.bundle import export_base  # noqa: E402
from edgeadapt.format import read_manifest  # noqa: E402
from edgeadapt.format.types import Adapter, ShiraDelta  # noqa: E402
from edgeadapt.models import LoadedModel, LogitsModule, example_inputs  # noqa: E402
from edgeadapt.models import target_weight_names as twn  # noqa: E402
from edgeadapt.numeric import rel_error as rel_err  # noqa: E402
from edgeadapt.runtime.backends.executorch.store import ExecutorchStore  # noqa: E402

MAX_BATCH, MAX_SEQ = 8, 64  # export_base's defaults


_SHARED: dict[str, tuple[LoadedModel, Path]] = {}


def shared_bundle(tmp_path_factory) -> tuple[LoadedModel, Path]:
    """A one-block Llama bundle (``export_base``: q/v live, ExecuTorch only, live and constant
    programs, no adapters) exported once per test session and shared with
    tests/test_runtime_property_executorch.py: the lowering is what costs (tens of seconds)."""
    if "llama" not in _SHARED:
        torch.set_num_threads(1)
        lm = one_block_llama()
        out = tmp_path_factory.mktemp("pte")
        export_base(lm, out, backends=("executorch",), targets="qv", check=False)
        _SHARED["llama"] = (lm, out)
    return _SHARED["llama"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    lm, out = shared_bundle(tmp_path_factory)
    manifest = read_manifest(out)
    assert (manifest.executorch["max_batch"], manifest.executorch["max_seq"]) == \
        (MAX_BATCH, MAX_SEQ)
    return lm, out, manifest


def store_of(exported, mode: str) -> ExecutorchStore:
    _, out, manifest = exported
    w = manifest.weights
    return ExecutorchStore(out, manifest.executorch,
                           {k: v.executorch["buffer"] for k, v in w.items()},
                           {k: tuple(v.shape) for k, v in w.items()}, mode=mode)


def torch_logits(lm: LoadedModel, inputs: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return LogitsModule(lm)(**{k: torch.from_numpy(v) for k, v in inputs.items()}).numpy()


def inputs_of(lm: LoadedModel, batch: int, seq: int, seed: int = 3) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in example_inputs(lm, batch, seq, seed).items()}


def sparse_adapter(lm: LoadedModel, density: float = 0.05, seed: int = 0) -> Adapter:
    """A SHiRA-style adapter on every q/v weight with random positions and sizeable values."""
    rng = np.random.default_rng(seed)
    targets, shapes = {}, {}
    for w in twn(lm.model, "qv"):
        W = lm.model.get_parameter(w)
        n = W.numel()
        idx = np.sort(rng.choice(n, size=max(1, int(density * n)), replace=False))
        vals = rng.standard_normal(idx.size).astype(np.float32) * float(W.std()) * 3
        targets[w], shapes[w] = ShiraDelta(idx.astype(np.int64), vals), tuple(W.shape)
    return Adapter("shira", targets, shapes, {})


def write_sparse(store: ExecutorchStore, adapter: Adapter) -> None:
    """The engine's write: W[idx] = W0[idx] + v on the store's arrays (torch flat indices)."""
    for w, d in adapter.targets.items():
        view = store.live_weights()[w].torch_view()
        rows, cols = np.divmod(d.indices, view.shape[1])
        view[rows, cols] += d.values


def reference(lm: LoadedModel, adapter: Adapter) -> LoadedModel:
    ref = dataclasses.replace(lm, model=copy.deepcopy(lm.model))
    apply_adapter_torch(ref.model, adapter)
    return ref


@pytest.mark.parametrize("shape", [(1, 1), (1, MAX_SEQ), (MAX_BATCH, MAX_SEQ), (3, 5)])
def test_base_parity(exported, shape):
    lm = exported[0]
    store = store_of(exported, "live")
    inp = inputs_of(lm, *shape)
    assert rel_err(store.run(inp), torch_logits(lm, inp)) <= 1e-4


def test_only_live_weights_are_buffers(exported):
    lm, _, manifest = exported
    store = store_of(exported, "live")
    assert set(store.live_weights()) == set(twn(lm.model, "qv"))
    for w, lw in store.live_weights().items():      # mapping by value
        assert np.array_equal(lw.array, lm.model.get_parameter(w).numpy())
    k_proj = "model." + twn(lm.model, r"\.k_proj$")[0]
    with pytest.raises(BundleError):
        store._attribute(k_proj)
    assert manifest.executorch["repack"]["file"].endswith(".const.pte")


def test_live_edit_matches_torch_and_reverts(exported):
    lm = exported[0]
    store = store_of(exported, "live")
    adapter = sparse_adapter(lm)
    base_copy = {w: lw.array.copy() for w, lw in store.live_weights().items()}
    inp = inputs_of(lm, 2, MAX_SEQ)
    base_out = store.run(inp)
    write_sparse(store, adapter)
    store.commit({w: None for w in adapter.targets})
    ref = torch_logits(reference(lm, adapter), inp)
    got = store.run(inp)
    assert rel_err(got, ref) <= 1e-4
    assert rel_err(base_out, ref) > 1e-2          # the edit matters: a stale run would fail
    for w, lw in store.live_weights().items():     # back to base
        lw.array[...] = base_copy[w]
    assert rel_err(store.run(inp), torch_logits(lm, inp)) <= 1e-4


def test_repack_stale_until_commit_then_matches(exported):
    lm = exported[0]
    store = store_of(exported, "repack")
    adapter = sparse_adapter(lm, seed=1)
    inp = inputs_of(lm, 2, MAX_SEQ)
    write_sparse(store, adapter)
    ref = torch_logits(reference(lm, adapter), inp)
    # Constant, packed XNNPACK weights: editing the source bytes changes nothing until reload.
    stale = store.run(inp)
    assert rel_err(stale, torch_logits(lm, inp)) <= 1e-4
    assert rel_err(stale, ref) > 1e-2
    store.commit({w: None for w in adapter.targets})
    assert rel_err(store.run(inp), ref) <= 1e-4


def test_run_rejects_shapes_past_the_bounds(exported):
    lm = exported[0]
    store = store_of(exported, "live")
    with pytest.raises(ConfigError):
        store.run(inputs_of(lm, MAX_BATCH + 1, 2))
    with pytest.raises(ConfigError):
        store.run(inputs_of(lm, 1, MAX_SEQ + 1))
    with pytest.raises(ConfigError):
        store.run({})


@pytest.mark.parametrize("mode", ["live", "repack"])
def test_switch_engine_on_store(exported, mode):
    """The backend-neutral engine drives the store: SHiRA switches equal PyTorch, and any
    sequence ends with the base weights bit-identical."""
    from edgeadapt.runtime.engine import SwitchEngine

    lm = exported[0]
    store = store_of(exported, mode)
    engine = SwitchEngine(store)
    base = {w: lw.array.copy() for w, lw in store.live_weights().items()}
    a, b = sparse_adapter(lm, seed=2), sparse_adapter(lm, seed=3)
    pa, pb = engine.prepare(a, "a"), engine.prepare(b, "b")
    inp = inputs_of(lm, 2, MAX_SEQ)
    for active in ([pa], [pb], [pa, pb], []):
        engine.switch([(p, 1.0) for p in active])
        ref = lm
        for p in active:
            ref = reference(ref, a if p is pa else b)
        assert rel_err(engine.run(inp), torch_logits(ref, inp)) <= 1e-4
    for w, lw in store.live_weights().items():
        assert np.array_equal(lw.array, base[w])


@pytest.mark.parametrize("skip_reload", [False, True])
def test_runtime_parity_check_fails_on_stale_packed_weights(exported, skip_reload):
    """Through ``edgeadapt.runtime.load`` in repack mode: a switch followed by its program
    reload matches PyTorch; the same switch with the reload skipped (packed weights never see
    the edit) fails the very same check."""
    from edgeadapt.runtime import load

    lm, bundle, manifest = exported
    adapter = dataclasses.replace(sparse_adapter(lm, seed=4), weight_sha256={
        w: manifest.weights[w].sha256 for w in manifest.weights})
    inp = inputs_of(lm, 2, 7)
    rt = load(bundle, backend="executorch", mode="repack")
    assert rt.mode == "repack"
    if skip_reload:
        rt.store.commit = lambda changes: None
    rt.engine.switch([(rt.engine.prepare(adapter, "s"), 1.0)])
    err = rel_err(rt.run(**inp), torch_logits(reference(lm, adapter), inp))
    assert (err > 1e-2) if skip_reload else (err <= 1e-4)


@pytest.mark.parametrize("mode", ["live", "repack"])
def test_concurrent_runs_while_switching(exported, mode):
    """Threads run different inputs while another thread switches between the base and a SHiRA
    adapter: no exception, and every output equals (1e-6) that input's output in one of the two
    states, computed alone beforehand. ExecuTorch keeps a method's activations in memory planned
    once per program, so two runs at the same time must not share it. The switching goes on
    until every reader has finished a few runs (so the check is never vacuous)."""
    import threading
    import time

    from edgeadapt.runtime.engine import SwitchEngine

    lm = exported[0]
    engine = SwitchEngine(store_of(exported, mode))
    prep = engine.prepare(sparse_adapter(lm, seed=4), "a")
    feeds = [inputs_of(lm, b, s, seed=b + s) for b, s in ((1, 1), (2, 9), (4, MAX_SEQ))]
    want = {}
    for state in ([], [(prep, 1.0)]):
        engine.switch(state)
        want[len(state)] = [engine.run(f) for f in feeds]
    assert all(rel_err(x, y) > 1e-3 for x, y in zip(want[0], want[1], strict=True))
    bad: list[str] = []
    runs = [0] * len(feeds)  # runs each reader finished
    stop = threading.Event()

    def reader(k: int) -> None:
        try:
            while not stop.is_set():
                got = engine.run(feeds[k])
                if min(rel_err(got, want[0][k]), rel_err(got, want[1][k])) > 1e-6:
                    bad.append(f"input {k}: matches neither state")
                runs[k] += 1
        except Exception as exc:  # noqa: BLE001 - any failure is the finding
            bad.append(repr(exc))

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(len(feeds))]
    for t in threads:
        t.start()
    i, switches = 0, 6 if mode == "repack" else 30
    end = time.monotonic() + 120
    # at least `switches` switches, and on until every reader has run 3 times (or has stopped,
    # or two minutes have passed: the assert below then reports the starved reader)
    while i < switches or (min(runs) < 3 and all(t.is_alive() for t in threads)
                           and time.monotonic() < end):
        engine.switch([(prep, 1.0)] if i % 2 == 0 else [])
        i += 1
        if i >= switches:  # the readers lag behind back-to-back switches: let them in
            time.sleep(0.001)  # let them in, as tests/switching.py does
    stop.set()
    for t in threads:
        t.join()
    assert not bad, bad[:3]
    assert min(runs) >= 3, runs  # every reader ran while the switches went on


def test_auto_repacks_where_the_kernel_cannot_be_built(exported, tmp_path, monkeypatch):
    """An own-kernel bundle where the kernel cannot be built (no C++ compiler, nothing cached):
    ``auto`` takes the constant program, which calls no custom kernel, and still matches
    PyTorch after a switch; ``live`` refuses with a ConfigError naming the compiler."""
    from edgeadapt.runtime import load, native
    from edgeadapt.runtime.backends.executorch import kernel as ek

    lm, out, manifest = exported
    if manifest.executorch.get("live_form") != "own-kernel":
        pytest.skip("exported without a C++ compiler (weight-left)")
    assert load(out, backend="executorch").mode == "live"  # the kernel builds here
    monkeypatch.setattr(ek._LIBRARY, "loaded", None)  # as in a fresh process ...
    monkeypatch.setenv("EDGEADAPT_CACHE", str(tmp_path))  # ... with nothing built ...
    monkeypatch.setenv("CXX", "")
    monkeypatch.setattr(native.shutil, "which", lambda name: None)  # ... and no compiler
    rt = load(out, backend="executorch", mode="auto")
    assert rt.mode == "repack" and "C++ compiler" in rt.mode_reason
    adapter = dataclasses.replace(sparse_adapter(lm, seed=5), weight_sha256={
        w: manifest.weights[w].sha256 for w in manifest.weights})
    rt.engine.switch([(rt.engine.prepare(adapter, "s"), 1.0)])
    inp = inputs_of(lm, 2, 5)
    assert rel_err(rt.run(**inp), torch_logits(reference(lm, adapter), inp)) <= 1e-4
    with pytest.raises(ConfigError, match=r"C\+\+ compiler"):
        load(out, backend="executorch", mode="live")


def test_threads_resize_the_pool_only_while_no_program_uses_it(exported):
    """ExecuTorch's threadpool is per process and resizing destroys it under every loaded
    XNNPACK program: with a store alive, another size is refused and the pool is untouched;
    the same size (or None) is accepted."""
    from edgeadapt.runtime.backends.executorch.store import threadpool_size, use_threads

    store = store_of(exported, "live")
    size = threadpool_size()
    with pytest.raises(ConfigError, match="per process"):
        use_threads(size + 1)
    assert threadpool_size() == size and use_threads(size) == size == use_threads(None)
    assert store.threads == size


def test_threads_in_a_fresh_process(exported, tmp_path):
    """``load(threads=n)`` in a fresh process (no program loaded yet) resizes the pool to n, and
    the program then matches PyTorch; a second runtime at the same size loads alongside."""
    import subprocess
    import sys

    lm, out, _ = exported
    inp = inputs_of(lm, 2, 6)
    np.savez(tmp_path / "inp.npz", **inp)
    script = f"""
import numpy as np
from edgeadapt.runtime import load
from edgeadapt.runtime.backends.executorch.store import threadpool_size
n = threadpool_size() + 1
rt = load({str(out)!r}, backend="executorch", mode="live", threads=n)
assert threadpool_size() == n == rt.store.threads, (threadpool_size(), n)
rt2 = load({str(out)!r}, backend="executorch", mode="live", threads=n)
inp = dict(np.load({str(tmp_path / "inp.npz")!r}))
np.save({str(tmp_path / "out.npy")!r}, rt.run(**inp))
assert np.array_equal(rt2.run(**inp), np.load({str(tmp_path / "out.npy")!r}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    assert rel_err(np.load(tmp_path / "out.npy"), torch_logits(lm, inp)) <= 1e-4


@pytest.mark.parametrize("mode", ["live", "repack"])
def test_a_damaged_program_is_a_bundle_error(exported, tmp_path, mode):
    """ExecuTorch's own errors on a truncated .pte (live program, or the constant program of
    repack mode) come back as a BundleError naming the file."""
    import shutil

    from edgeadapt.runtime import load

    _, out, manifest = exported
    copy_dir = tmp_path / "bundle"
    shutil.copytree(out, copy_dir)
    name = manifest.executorch["file"] if mode == "live" else \
        manifest.executorch["repack"]["file"]
    pte = copy_dir / name
    raw = pte.read_bytes()
    pte.write_bytes(raw[: len(raw) // 3])
    with pytest.raises(BundleError, match=name):
        load(copy_dir, backend="executorch", mode=mode)
