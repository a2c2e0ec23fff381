"""Switch engine on a plain numpy store: values against hand-computed references, exact return
to base after any sequence of switches (hypothesis), transactional failures, concurrency."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from switching import runs_while_switching

from edgeadapt.errors import (
    AdapterFormatError,
    FingerprintMismatchError,
    SwitchError,
    TargetMismatchError,
)
from edgeadapt.format.fingerprint import weight_sha256
from edgeadapt.format.types import Adapter, LoraDelta, ShiraDelta, SiraBranch
from edgeadapt.runtime.engine import SwitchEngine
from edgeadapt.runtime.pages import HUGE_PAGE, arena_copies, collapse_to_huge_pages, one_span
from edgeadapt.runtime.store import ArrayStore, to_backend_index

SHAPES = {"w.q": (6, 5), "w.v": (6, 5), "w.o": (4, 6), "w.b": (64, 3)}  # w.b: blocked32


def base_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}


def shas(weights):
    return {n: weight_sha256(w) for n, w in weights.items()}


def shira(weights, names, density, seed, dtype=np.float32):
    rng = np.random.default_rng(seed)
    targets = {}
    for n in names:
        size = int(np.prod(SHAPES[n]))
        k = max(1, int(density * size))
        idx = np.sort(rng.choice(size, k, replace=False)).astype(np.int64)
        targets[n] = ShiraDelta(idx, rng.standard_normal(k).astype(dtype))
    return Adapter("shira", targets, {n: SHAPES[n] for n in names},
                   {n: weight_sha256(weights[n]) for n in names})


def lora(weights, names, rank, seed):
    rng = np.random.default_rng(seed)
    targets = {n: LoraDelta(rng.standard_normal((rank, SHAPES[n][1])).astype(np.float32),
                            rng.standard_normal((SHAPES[n][0], rank)).astype(np.float32))
               for n in names}
    return Adapter("lora", targets, {n: SHAPES[n] for n in names},
                   {n: weight_sha256(weights[n]) for n in names})


def reference(weights, adapters_scales):
    """Independent reference: dense float64 sum of every delta, in torch layout."""
    out = {n: w.astype(np.float64) for n, w in weights.items()}
    for ad, s in adapters_scales:
        for n, d in ad.targets.items():
            if isinstance(d, ShiraDelta):
                out[n].reshape(-1)[d.indices] += s * d.values.astype(np.float64)
            else:
                out[n] += s * (d.B.astype(np.float64) @ d.A.astype(np.float64))
    return out


def store_weights(store):
    return {n: lw.torch_weight().copy() for n, lw in store.live_weights().items()}


LAYOUT_CHOICES = [{}, {"w.q": "transposed", "w.o": "transposed", "w.b": "blocked32"}]


def test_backend_index_maps_torch_positions():
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    t = np.ascontiguousarray(w.T)
    idx = np.arange(12)
    assert np.array_equal(t.reshape(-1)[to_backend_index(idx, (3, 4), "transposed")],
                          w.reshape(-1))
    assert np.array_equal(to_backend_index(idx, (3, 4), "as-is"), idx)
    # blocked32, by hand: torch (r, c) of a (64, 3) weight sits at (r // 32) * 96 + c * 32 + r % 32
    w = np.arange(64 * 3, dtype=np.float32).reshape(64, 3)
    blocked = np.stack([w[:32].T, w[32:].T])  # (2, 3, 32)
    idx = np.arange(w.size)
    assert np.array_equal(blocked.reshape(-1)[to_backend_index(idx, (64, 3), "blocked32")],
                          w.reshape(-1))
    assert to_backend_index(np.array([40 * 3 + 2]), (64, 3), "blocked32")[0] == 96 + 64 + 8


@pytest.mark.parametrize("layouts", LAYOUT_CHOICES)
def test_switch_values_match_reference(layouts):
    w0 = base_weights()
    store = ArrayStore(w0, layouts, shas(w0))
    eng = SwitchEngine(store, verify_base=True)
    a = shira(w0, ["w.q", "w.v", "w.b"], 0.3, 1)
    b = shira(w0, ["w.q", "w.o", "w.b"], 0.3, 2)  # overlaps a on w.q and w.b
    c = lora(w0, ["w.v", "w.o", "w.b"], 2, 3)
    pa, pb, pc = (eng.prepare(x, n) for x, n in ((a, "a"), (b, "b"), (c, "c")))
    for combo in ([(a, 1.0)], [(a, 1.0), (b, 0.5)], [(c, 0.7)], [(a, 1.0), (c, 1.0)],
                  [(b, -2.0), (c, 0.25), (a, 1.0)]):
        prep = {id(a): pa, id(b): pb, id(c): pc}
        eng.switch([(prep[id(ad)], s) for ad, s in combo])
        ref = reference(w0, combo)
        got = store_weights(store)
        for n in SHAPES:
            np.testing.assert_allclose(got[n], ref[n], rtol=1e-5, atol=1e-5)
    eng.switch([])
    for n, w in store_weights(store).items():
        assert np.array_equal(w.view(np.uint32), w0[n].view(np.uint32))
    assert eng.restore_memory_bytes() == 0


def test_single_shira_is_exactly_w0_plus_value():
    w0 = base_weights()
    store = ArrayStore(w0)
    eng = SwitchEngine(store)
    a = shira(w0, ["w.q"], 0.5, 4)
    eng.switch([(eng.prepare(a, "a"), 1.0)])
    d = a.targets["w.q"]
    got = store.live_weights()["w.q"].array.reshape(-1)
    want = w0["w.q"].reshape(-1).copy()
    want[d.indices] = want[d.indices] + d.values
    assert np.array_equal(got, want)
    # a sparse switch writes the union of positions once and reports it to commit
    assert np.array_equal(store.commits[-1]["w.q"], d.indices)


def test_lora_restore_memory_is_whole_matrix():
    w0 = base_weights()
    eng = SwitchEngine(ArrayStore(w0))
    eng.switch([(eng.prepare(lora(w0, ["w.v"], 2, 0), "l"), 1.0)])
    assert eng.restore_memory_bytes() == w0["w.v"].nbytes
    eng.switch([(eng.prepare(shira(w0, ["w.v"], 0.2, 0), "s"), 1.0)])
    assert eng.restore_memory_bytes() == 6 * 12  # 6 positions x (int64 + float32)


@settings(max_examples=60, deadline=None)
@given(
    layout=st.sampled_from(LAYOUT_CHOICES),
    arena=st.booleans(),
    steps=st.lists(
        st.one_of(
            st.none(),
            st.lists(st.tuples(st.integers(0, 4), st.sampled_from([1.0, 0.5, -1.0, 3.0])),
                     min_size=1, max_size=3),
        ),
        min_size=1, max_size=8,
    ),
)
def test_any_switch_sequence_returns_base_bit_exact(layout, arena, steps):
    w0 = base_weights(7)
    store = ArrayStore(w0, layout, shas(w0), arena=arena)
    eng = SwitchEngine(store)
    adapters = [shira(w0, ["w.q", "w.v", "w.b"], 0.2, 1),
                shira(w0, ["w.q", "w.o"], 0.5, 2, np.float16),
                lora(w0, ["w.v", "w.b"], 2, 3), lora(w0, ["w.q", "w.o"], 1, 4),
                shira(w0, ["w.o"], 1.0, 5)]
    preps = [eng.prepare(a, f"a{i}") for i, a in enumerate(adapters)]
    for step in steps:
        combo = [] if step is None else [(preps[i], s) for i, s in step]
        eng.switch(combo)
        if step is not None:
            ref = reference(w0, [(adapters[i], s) for i, s in step])
            for n, w in store_weights(store).items():
                np.testing.assert_allclose(w, ref[n], rtol=1e-4, atol=1e-4)
    eng.switch([])
    for n, w in store_weights(store).items():
        assert np.array_equal(w.view(np.uint32), w0[n].view(np.uint32)), n


def _hash_store(store):
    return {n: weight_sha256(lw.array) for n, lw in store.live_weights().items()}


def test_bad_adapters_raise_typed_errors_and_leave_weights():
    w0 = base_weights()
    store = ArrayStore(w0, {"w.q": "transposed"}, shas(w0))
    eng = SwitchEngine(store)
    good = eng.prepare(shira(w0, ["w.q"], 0.3, 1), "good")
    eng.switch([(good, 1.0)])
    before = _hash_store(store)

    other = shira(base_weights(99), ["w.q"], 0.3, 1)
    with pytest.raises(FingerprintMismatchError):
        eng.prepare(other, "other")
    nan = shira(w0, ["w.v"], 0.3, 1)
    nan.targets["w.v"].values[0] = np.nan
    with pytest.raises(AdapterFormatError):
        eng.prepare(nan, "nan")
    oob = shira(w0, ["w.v"], 0.3, 1)
    oob.targets["w.v"].indices[-1] = 30
    with pytest.raises(AdapterFormatError):
        eng.prepare(oob, "oob")
    unsorted = shira(w0, ["w.v"], 0.3, 1)
    unsorted.targets["w.v"].indices[[0, 1]] = unsorted.targets["w.v"].indices[[1, 0]]
    with pytest.raises(AdapterFormatError):
        eng.prepare(unsorted, "unsorted")
    not_live = Adapter("shira", {"w.x": ShiraDelta(np.array([0]), np.ones(1, np.float32))},
                       {"w.x": (2, 2)}, {"w.x": "0" * 64})
    with pytest.raises(TargetMismatchError):
        eng.prepare(not_live, "x")
    bad_lora = lora(w0, ["w.v"], 2, 0)
    bad_lora.targets["w.v"] = LoraDelta(np.ones((2, 4), np.float32), np.ones((6, 2), np.float32))
    with pytest.raises(AdapterFormatError):
        eng.prepare(bad_lora, "badlora")
    sira = Adapter("sira", {"w.v": SiraBranch(np.ones((2, 5), np.float32),
                                               np.ones((2, 1, 5), np.float32),
                                               np.ones((2, 6, 1), np.float32), 1, 1.0)},
                   {"w.v": (6, 5)}, {"w.v": weight_sha256(w0["w.v"])})
    with pytest.raises(SwitchError):
        eng.prepare(sira, "sira")
    with pytest.raises(SwitchError):  # overflow to inf in the second adapter's weight
        eng.switch([(good, 1.0), (eng.prepare(shira(w0, ["w.o"], 0.3, 2), "b"), 1e39)])
    assert _hash_store(store) == before
    assert eng.active == (("good", 1.0),)


class FailingStore(ArrayStore):
    fail = 0  # how many of the next commits fail

    def commit(self, changes):
        if self.fail:
            self.fail -= 1
            raise RuntimeError("device lost")
        super().commit(changes)


def test_commit_failure_rolls_back():
    w0 = base_weights()
    store = FailingStore(w0)
    eng = SwitchEngine(store)
    a = eng.prepare(shira(w0, ["w.q"], 0.3, 1), "a")
    c = eng.prepare(lora(w0, ["w.v"], 2, 1), "c")
    eng.switch([(a, 1.0)])
    before = _hash_store(store)
    store.fail = 1
    with pytest.raises(SwitchError, match="switch undone"):
        eng.switch([(c, 1.0)])
    assert _hash_store(store) == before and eng.active == (("a", 1.0),)
    store.fail = 2  # the restoring commit fails too: still a SwitchError, host state restored
    with pytest.raises(SwitchError, match="re-committing the previous weights failed too"):
        eng.switch([(c, 1.0)])
    assert _hash_store(store) == before and eng.active == (("a", 1.0),)
    eng.switch([])
    assert all(np.array_equal(w, w0[n]) for n, w in store_weights(store).items())


def _mlp(inputs, w):
    """Slow enough forward that reads each weight several times (a torn read would show)."""
    x = inputs["x"]
    h = np.tanh(x @ w["w.q"].T) + np.tanh(x @ w["w.v"].T)
    return np.tanh(h @ w["w.o"].T)


def test_runs_never_see_half_applied_weights():
    w0 = base_weights()
    store = ArrayStore(w0, {"w.v": "transposed"}, forward=_mlp)
    eng = SwitchEngine(store)
    preps = [eng.prepare(shira(w0, list(SHAPES), 0.5, 1), "a"),
             eng.prepare(lora(w0, ["w.q", "w.o"], 2, 2), "b")]
    x = {"x": np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)}
    states = [[], [(preps[0], 1.0)], [(preps[1], 1.0)], [(preps[0], 0.5), (preps[1], 1.0)]]
    valid = []
    for s in states:
        eng.switch(s)
        valid.append(eng.run(x))
    eng.switch([])
    errors, outputs = runs_while_switching(lambda: eng.run(x), eng.switch, states, readers=3,
                                           switches=300, seed=1, min_runs=20)
    assert not errors
    assert len(outputs) >= 20
    for y in outputs:
        assert any(np.array_equal(y, v) for v in valid)


@pytest.mark.parametrize("arena", [False, True])
def test_cached_switch_plans_equal_uncached_bit_for_bit(monkeypatch, arena):
    """Plans remembered per pair of adapter sets (both directions) write exactly what planning
    from scratch writes; the cache is really used (fewer merges) and bounded. With the live
    arrays in one arena a cached switch is one scatter over all of them, else one batch of
    scatters (one native call)."""
    import edgeadapt.runtime.engine as engine_mod

    merges = []
    real_merge = engine_mod.merge_sorted
    monkeypatch.setattr(engine_mod, "merge_sorted",
                        lambda a, b: merges.append(1) or real_merge(a, b))
    w0 = base_weights(3)
    layouts = {"w.q": "transposed"}
    adapters = [shira(w0, ["w.q", "w.v"], 0.3, 1), shira(w0, ["w.q", "w.o"], 0.4, 2),
                shira(w0, ["w.v"], 0.5, 3)]
    stores = [ArrayStore(w0, layouts), ArrayStore(w0, layouts, arena=arena)]
    engines = [SwitchEngine(stores[0], plan_cache=0), SwitchEngine(stores[1], plan_cache=2)]
    assert engines[0]._span is None and (engines[1]._span is not None) == arena
    preps = [[e.prepare(a, f"a{i}") for i, a in enumerate(adapters)] for e in engines]
    steps = [[0], [1], [0], [1], [0, 1], [0], [1], [2], [1], [0], [2], None, [0], None]
    counts = []
    for step in steps:
        for e, p in zip(engines, preps, strict=True):
            merges.clear()
            e.switch([] if step is None else [(p[i], 0.5 + i) for i in step])
            counts.append(len(merges))
        a, b = (store_weights(s) for s in stores)
        ref = reference(w0, [] if step is None else [(adapters[i], 0.5 + i) for i in step])
        for n in a:
            assert np.array_equal(a[n].view(np.uint32), b[n].view(np.uint32)), (step, n)
            np.testing.assert_allclose(b[n], ref[n], rtol=1e-5, atol=1e-5)
    uncached, cached = counts[0::2], counts[1::2]
    assert cached[3] == 0 and cached[2] == 0  # [1] -> [0] and back: reverse + forward hit
    assert uncached[3] > 0 and sum(cached) < sum(uncached)
    assert len(engines[1]._pairs) == 2
    assert all((p.to_b.scatter is not None) == arena for p in engines[1]._pairs)
    assert all((p.to_b.batch is not None) != arena and (p.to_a.batch is not None) != arena
               for p in engines[1]._pairs)
    for n, w in store_weights(stores[1]).items():  # ended at None: the base, bit for bit
        assert np.array_equal(w.view(np.uint32), w0[n].view(np.uint32)), n


@pytest.mark.parametrize("arena", [False, True])
def test_commit_failure_rolls_back_a_cached_switch(arena):
    w0 = base_weights()
    store = FailingStore(w0, {"w.v": "transposed"}, arena=arena)
    eng = SwitchEngine(store)
    a = eng.prepare(shira(w0, ["w.q", "w.v"], 0.3, 1), "a")
    b = eng.prepare(shira(w0, ["w.v"], 0.3, 2), "b")
    for x in (a, b, a):  # a -> b is now a cached pair
        eng.switch([(x, 1.0)])
    before = _hash_store(store)
    store.fail = 1
    with pytest.raises(SwitchError):
        eng.switch([(b, 1.0)])
    assert _hash_store(store) == before and eng.active == (("a", 1.0),)
    eng.switch([(b, 1.0)])
    ref = reference(w0, [(eng_ad, 1.0) for eng_ad in [shira(w0, ["w.v"], 0.3, 2)]])
    for n, w in store_weights(store).items():
        np.testing.assert_allclose(w, ref[n], rtol=1e-6, atol=1e-6)
    eng.switch([])
    assert all(np.array_equal(w, w0[n]) for n, w in store_weights(store).items())


@pytest.mark.parametrize("arena", [False, True])
def test_plan_cache_memory_counts_positions_and_both_values(arena):
    w0 = base_weights()
    eng = SwitchEngine(ArrayStore(w0, arena=arena))
    ads = [shira(w0, ["w.q", "w.v"], 0.3, 1), shira(w0, ["w.q"], 0.4, 2)]
    a, b = (eng.prepare(x, f"a{i}") for i, x in enumerate(ads))
    eng.switch([(a, 1.0)])
    eng.switch([(b, 1.0)])
    ia, ib = ads[0].targets, ads[1].targets
    union_q = np.union1d(ia["w.q"].indices, ib["w.q"].indices).size
    first = ia["w.q"].indices.size + ia["w.v"].indices.size  # base -> a: a's own positions
    # base -> a: values only; a -> b: new positions on w.q, a's own positions on w.v
    span = 8 * (first + union_q + ia["w.v"].indices.size) if arena else 0  # span positions
    assert eng.plan_cache_bytes() == \
        8 * first + 16 * union_q + 8 * ia["w.v"].indices.size + span
    assert SwitchEngine(ArrayStore(w0), plan_cache=0).plan_cache_bytes() == 0


def test_arena_copies_are_aligned_independent_views_of_one_allocation():
    rng = np.random.default_rng(0)
    src = {"a": rng.standard_normal((3, 5)).astype(np.float32),  # 15 floats: padding follows
           "b": rng.standard_normal((2, 32, 4)).astype(np.float32),
           "c": rng.standard_normal((7,)).astype(np.float16)}  # converted to float32
    out = arena_copies(src)
    assert list(out) == list(src)
    base = out["a"].base
    for name, arr in out.items():
        np.testing.assert_array_equal(arr, src[name].astype(np.float32))
        assert arr.dtype == np.float32 and arr.shape == src[name].shape
        assert arr.flags.c_contiguous and arr.flags.writeable
        assert arr.ctypes.data % 64 == 0 and arr.base is base  # one allocation, line-aligned
    out["a"][0, 0] = 99.0  # copies: the sources and the other weights are untouched
    assert src["a"][0, 0] != 99.0
    np.testing.assert_array_equal(out["b"], src["b"])
    assert not np.shares_memory(out["a"], out["b"])


def test_one_span_covers_arrays_back_to_back_and_nothing_else():
    """A view over the memory of arrays that lie back to back (an arena: padding <= 64 bytes
    between them), each array at its byte offset; None for gaps, mixed dtypes, strided views."""
    rng = np.random.default_rng(0)
    src = {"a": rng.standard_normal((3, 5)).astype(np.float32),  # 15 floats: 4 B of padding
           "b": rng.standard_normal((4, 8)).astype(np.float32),
           "e": np.zeros((0, 3), np.float32)}
    out = arena_copies(src)
    span, offsets = one_span(out)
    for name in ("a", "b"):
        assert offsets[name] * 4 == out[name].ctypes.data - out["a"].ctypes.data
        np.testing.assert_array_equal(span[offsets[name]:offsets[name] + out[name].size],
                                      out[name].reshape(-1))
    span[offsets["b"] + 5] = 42.0  # writes through the span land in the array
    assert out["b"].reshape(-1)[5] == 42.0
    big = np.zeros(4000, np.float32)
    assert one_span({"x": big[:1000], "y": big[2000:3000]}) is None  # a gap
    assert one_span({"x": big[:1000], "y": big[1000:2000].view(np.int32)}) is None
    assert one_span({"x": big[:1000], "y": big[1000:3000:2]}) is None  # strided
    assert one_span({"x": big[:1000], "y": big[1000:2000]})[1] == {"x": 0, "y": 1000}
    assert one_span({}) is None


def test_collapse_to_huge_pages_keeps_contents():
    """An optimisation only: whatever the kernel does, the values stay and the count is whole
    2 MiB pages inside the arrays' span (0 where MADV_COLLAPSE is unsupported)."""
    rng = np.random.default_rng(0)
    arrays = {"a": rng.standard_normal(3 << 20).astype(np.float32),  # 12 MiB
              "b": rng.standard_normal(1000).astype(np.float32)}
    before = {n: a.copy() for n, a in arrays.items()}
    done = collapse_to_huge_pages(arrays)
    assert done % HUGE_PAGE == 0 and 0 <= done <= sum(a.nbytes for a in arrays.values())
    for n, a in arrays.items():
        np.testing.assert_array_equal(a, before[n])
