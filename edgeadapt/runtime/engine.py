"""The backend-neutral switch engine (numpy only, no torch).

(Over 400 lines because the switch is one transaction: planning, the plan cache and the write
with its undo share the state they check, and split apart they would pass it around.)

A backend hands the engine a :class:`~edgeadapt.runtime.store.WeightStore`: for every *live*
weight (one an adapter may touch) a writable numpy array that aliases the buffer the backend
computes with, plus its layout, and two hooks, ``run`` and ``commit``. Adapters are validated
and mapped to the store's layouts once (:mod:`edgeadapt.runtime.prepared`). The engine then
applies fused adapters in place:

- SHiRA   ``W[idx] = W0[idx] + sum_k s_k * v_k``   from saved base values ``W0[idx]``, never by
  adding and subtracting, so any sequence of switches returns the base bit for bit. Overlapping
  positions of fused adapters add their deltas. A switch is one sorted scatter over the union of
  outgoing and incoming positions: outgoing-only positions get their base value back, incoming
  ones their new value. Memory kept for restore: the base values at the active positions
  (4 bytes per position for fp32 weights, plus the int64 positions: 12 bytes per position).
- LoRA / pruned SoRA   ``W = W0 + sum_k s_k * B_k @ A_k``   over the touched matrices; the
  original of each touched matrix is kept while an adapter is active (4 * out * in bytes per
  fp32 matrix: the whole matrix, against SHiRA's 1%) and written back for an exact restore.
- Task head (classifiers)   ``W = H``   the first active adapter's head replaces the head weight;
  the original is kept like a LoRA-touched matrix (labels x hidden floats: a few KiB).

Layouts (:mod:`edgeadapt.format.layout`): ``"as-is"`` buffers are (out, in) like PyTorch,
``"transposed"`` buffers (in, out), ``"blocked32"`` buffers (out / 32, in, 32). Torch flat index
``i = r * in + c`` is backend flat index ``i`` (as-is), ``c * out + r`` (transposed) or
``(r // 32) * in * 32 + c * 32 + r % 32`` (blocked32); see :func:`to_backend_index`.

Switch plans are cached: a SHiRA-only switch between two adapter sets (X -> Y) is planned once
(merge of the position lists, gather of base values, new values, finite checks) and remembered as
a pair: the union positions ``U`` and the values of both states at ``U`` (``W_X[U]`` and
``W_Y[U]``), so X -> Y and Y -> X are each a single scatter per weight afterwards, or a single
scatter in all where the live arrays lie back to back in one block of memory (ONNX Runtime's
arena, ExecuTorch's planned buffers: :func:`edgeadapt.runtime.pages.one_span`; positions
offset into it, +8 bytes per union position); scatters run in native code that prefetches
the lines ahead, on the runtime's threads (``write_threads``: the runs are held off meanwhile;
:mod:`edgeadapt.runtime.scatter`, numpy without a compiler). The values are
fixed because the base is: ``W_Y[U] = W0[U] + sum_k s_k * v_k`` (on Y's positions), ``W0[U]``
elsewhere. Memory per cached pair: 16 bytes per union position (int64 position + two fp32
values; 8 where the union is an adapter's own position array); the last ``plan_cache`` pairs
are kept (default :data:`PLAN_CACHE`, 0 disables). Plans with a dense write (LoRA, heads) are
not cached.

Switches are transactional: everything is validated and every new value computed (and checked
finite) before the first write; if the store's ``commit`` fails the old values are written back.
Runs take a readers-writer lock shared and the write + commit of a switch take it exclusive, so
no run ever sees half-applied weights; a runtime hands the engine its own lock
(:class:`~edgeadapt.runtime.locks.ReadWriteLock`), so one lock orders its runs and switches.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from edgeadapt.errors import FingerprintMismatchError, SwitchError
from edgeadapt.format import nibbles
from edgeadapt.format.fingerprint import weight_sha256
from edgeadapt.format.layout import TRANSPOSED, backend_view
from edgeadapt.format.types import Adapter
from edgeadapt.runtime.locks import ReadWriteLock
from edgeadapt.runtime.pages import one_span
from edgeadapt.runtime.prepared import PreparedAdapter, prepare_adapter
from edgeadapt.runtime.scatter import Batch, native_scatter, scatter, scatter_nibbles
from edgeadapt.runtime.store import LiveWeight, WeightStore

# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """New values for one weight and the engine state after the switch."""

    union: np.ndarray | None  # sparse write: backend flat indices (sorted)
    vals: np.ndarray | None  # sparse write: values at union
    full: np.ndarray | None  # dense write: whole new array
    sparse_state: tuple[np.ndarray, np.ndarray] | None  # (idx, base values) after switch
    dense_state: np.ndarray | None  # original matrix kept after switch
    old: np.ndarray | None = None  # sparse write: the values at union before it
    saturated: int = 0  # quantized weights: entries whose code was clamped to the range


@dataclass
class _Switch:
    """Everything one switch writes and the engine state it leaves (a cached pair keeps two)."""

    plans: dict[str, _Plan]
    changes: dict[str, np.ndarray | None]  # for WeightStore.commit
    sparse: dict[str, tuple[np.ndarray, np.ndarray]]  # engine._sparse after the switch
    dense: dict[str, np.ndarray]  # engine._dense after the switch
    # a cached switch on live arrays that share one span of memory: (positions in the span,
    # new values, old values), written by one scatter; the plans' vals / old are views of them
    scatter: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    # a cached switch on live arrays that do not: its writes and their undo, each one native
    # call (scatter.Batch)
    batch: tuple[Batch, Batch] | None = None
    saturated: dict[str, int] = field(default_factory=dict)  # engine.saturated after it

    @classmethod
    def of(cls, plans: dict[str, _Plan]) -> _Switch:
        # plans cover every weight with state before or after, so the new state is theirs alone
        return cls(plans, {n: (None if p.full is not None else p.union) for n, p in plans.items()},
                   {n: p.sparse_state for n, p in plans.items() if p.sparse_state is not None},
                   {n: p.dense_state for n, p in plans.items() if p.dense_state is not None},
                   saturated={n: p.saturated for n, p in plans.items() if p.saturated})


@dataclass
class _PairPlan:
    """A cached SHiRA-only switch between adapter sets ``a`` and ``b`` (keys: (prepared,
    scale) tuples), both directions: ``to_b`` switches a -> b, ``to_a`` b -> a (same union
    positions; new and old values swapped)."""

    a: tuple
    b: tuple
    to_b: _Switch
    to_a: _Switch


def _same_key(x: tuple, y: tuple) -> bool:
    """Two active-set keys name the same prepared adapters (by identity) at the same scales."""
    return len(x) == len(y) and all(p is q and s == t for (p, s), (q, t) in zip(x, y, strict=True))


@dataclass
class _Combined:
    idx: np.ndarray | None = None
    delta: np.ndarray | None = None
    B: list[np.ndarray] = field(default_factory=list)
    A: list[np.ndarray] = field(default_factory=list)
    head: np.ndarray | None = None  # full replacement, backend layout


class SwitchEngine:
    """Applies fused adapters in place on a :class:`WeightStore`; thread-safe.

    ``switch([(prepared, scale), ...])`` makes exactly those adapters active (empty: base);
    ``run(inputs)`` forwards through the store with the readers lock held. ``lock``: the
    readers-writer lock to take (a runtime's own; default a new one). ``write_threads``: the
    threads a cached switch's native scatter writes with (None: the CPUs this process may run
    on); the write holds the runs off, so the cores they use are the write's meanwhile.
    """

    def __init__(self, store: WeightStore, verify_base: bool = False,
                 plan_cache: int | None = None, lock: ReadWriteLock | None = None,
                 write_threads: int | None = None) -> None:
        self.store = store
        self.live = store.live_weights()
        # all live arrays in one block of memory (ONNX Runtime's arena, ExecuTorch's planned
        # buffers): cached switches write them with one scatter (pages.one_span)
        self._span = _code_span(self.live)
        self.lock = ReadWriteLock() if lock is None else lock
        self._sparse: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._dense: dict[str, np.ndarray] = {}
        self._active: tuple[tuple[str, float], ...] = ()
        #: quantized weights: entries of the active state whose code was clamped to the code
        #: range (the delta needed more), per weight; {} when none (or no quantized weight)
        self.saturated: dict[str, int] = {}
        self._key: tuple[tuple[PreparedAdapter, float], ...] = ()  # the active set, by identity
        self.plan_cache = PLAN_CACHE if plan_cache is None else int(plan_cache)
        self._pairs: list[_PairPlan] = []  # least recently used first
        #: whether switches write through edgeadapt's native scatter (built now, not at the
        #: first switch) or numpy's fancy assignment (no C++ compiler; or set False)
        self.native_scatter = native_scatter()
        self.write_threads = max(1, write_threads or _cpus())
        if verify_base:
            self.verify_base()

    # -- public ----------------------------------------------------------------------------

    @property
    def active(self) -> tuple[tuple[str, float], ...]:
        """(name, scale) of the adapters now applied; () for the base model."""
        return self._active

    def prepare(self, adapter: Adapter, name: str) -> PreparedAdapter:
        return prepare_adapter(adapter, self.live, name)

    def verify_base(self) -> None:
        """Check every live weight hashes to its expected sha256 (only valid at base state; a
        quantized weight's codes to their own)."""
        for name, lw in self.live.items():
            want = lw.sha256 if lw.codes is None else lw.codes.codes_sha256
            if want is not None and weight_sha256(lw.torch_weight()) != want:
                raise FingerprintMismatchError(
                    f"live weight {name!r} does not match the bundle's sha256"
                )

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        with self.lock.shared():
            return self.store.run(inputs)

    def restore_memory_bytes(self) -> int:
        """Bytes kept now to restore the base exactly (positions + base values + matrices)."""
        sparse = sum(i.nbytes + v.nbytes for i, v in self._sparse.values())
        return sparse + sum(a.nbytes for a in self._dense.values())

    def plan_cache_bytes(self) -> int:
        """Bytes held by the cached switch plans: union positions (8 B each, unless the array is
        an adapter's own positions) and the values of both states (4 + 4 B per position)."""
        owned = {id(t.idx) for pair in self._pairs for key in (pair.a, pair.b)
                 for prep, _ in key for t in prep.targets.values()}
        arrays = {id(a): a.nbytes for pair in self._pairs for p in pair.to_b.plans.values()
                  for a in (p.union, p.vals, p.old) if a is not None and id(a) not in owned}
        spans = sum(pair.to_b.scatter[0].nbytes for pair in self._pairs if pair.to_b.scatter)
        return sum(arrays.values()) + spans

    def switch(self, adapters: list[tuple[PreparedAdapter, float]],
               then: Callable[[], None] | None = None) -> None:
        """Make ``adapters`` (prepared, scale) the active set; [] returns to the base.

        All new values are computed before the first write; on failure nothing changes.
        ``then``: called once the write is committed, still with runs excluded (a runtime
        changes the graph its runs take there, atomically with the weights).
        """
        for prep, scale in adapters:
            if not math.isfinite(scale):
                raise SwitchError(f"scale {scale} for adapter {prep.name!r} is not finite")
            unknown = set(prep.targets) - set(self.live)
            if unknown:
                raise SwitchError(f"adapter {prep.name!r} was prepared for another store")
        key = tuple((prep, float(scale)) for prep, scale in adapters)
        with self.lock.update():
            # Only switches write the arrays, and they are serialised by the update lock, so
            # the plan can be computed while runs go on.
            sw = self._cached_switch(self._key, key)
            if sw is None:
                with np.errstate(over="ignore", invalid="ignore"):  # caught by finite checks
                    sw = _Switch.of(self._plan(adapters))
                self._remember(self._key, key, sw)
            with self.lock.exclusive():
                undo = self._write(sw)
                try:
                    self.store.commit(sw.changes)
                except Exception as exc:
                    self._write_back(sw, undo)
                    try:
                        self.store.commit({name: None for name in sw.plans})
                    except Exception as again:
                        raise SwitchError(
                            f"backend commit failed, switch undone on the host ({exc}); "
                            f"re-committing the previous weights failed too ({again}): the "
                            "backend keeps what it last committed (if in doubt, reload "
                            "the runtime)") from exc
                    raise SwitchError(f"backend commit failed, switch undone: {exc}") from exc
                if then is not None:
                    then()
            self._sparse, self._dense = dict(sw.sparse), dict(sw.dense)
            self.saturated = dict(sw.saturated)
            self._active = tuple((p.name, float(s)) for p, s in adapters)
            self._key = key

    # -- planning --------------------------------------------------------------------------

    def _cached_switch(self, frm: tuple, to: tuple) -> _Switch | None:
        """The remembered switch ``frm`` -> ``to``, if any (marks it recently used).

        Valid because only the engine writes the live arrays: in state ``frm`` they hold exactly
        the values the pair recorded for it."""
        for i, pair in enumerate(self._pairs):
            if _same_key(pair.a, frm) and _same_key(pair.b, to):
                sw = pair.to_b
            elif _same_key(pair.b, frm) and _same_key(pair.a, to):
                sw = pair.to_a
            else:
                continue
            self._pairs.append(self._pairs.pop(i))
            return sw
        return None

    def _remember(self, frm: tuple, to: tuple, sw: _Switch) -> None:
        """Cache a SHiRA-only switch (no dense write before or after) with its reverse."""
        if self.plan_cache <= 0 or any(p.full is not None for p in sw.plans.values()):
            return
        back = {name: _Plan(union=p.union, vals=p.old, full=None,
                            sparse_state=self._sparse.get(name), dense_state=None, old=p.vals)
                for name, p in sw.plans.items()}
        rev = _Switch.of(back)
        rev.saturated = dict(self.saturated)  # the state it returns to, as it was planned
        if self._span is not None and sw.plans:
            self._one_scatter(sw, rev)
        elif sw.plans:
            self._batch(sw, rev)
        self._pairs.append(_PairPlan(frm, to, sw, rev))
        del self._pairs[:-self.plan_cache]

    def _one_scatter(self, fwd: _Switch, rev: _Switch) -> None:
        """Give a cached pair the positions of its union in the live weights' span and the
        values of both states there, in span order; the plans' values become views of them."""
        offsets = self._span[1]
        names = sorted(fwd.plans, key=offsets.__getitem__)
        pos = np.concatenate([fwd.plans[n].union + offsets[n] for n in names])
        new = np.concatenate([fwd.plans[n].vals for n in names])
        old = np.concatenate([fwd.plans[n].old for n in names])
        start = 0
        for n in names:
            stop = start + fwd.plans[n].union.size
            fwd.plans[n].vals = rev.plans[n].old = new[start:stop]
            fwd.plans[n].old = rev.plans[n].vals = old[start:stop]
            start = stop
        fwd.scatter, rev.scatter = (pos, new, old), (pos, old, new)

    def _batch(self, fwd: _Switch, rev: _Switch) -> None:
        """Give a cached pair whose live arrays are not one span its writes as batches: each
        direction's scatters of every weight one native call
        (:class:`~edgeadapt.runtime.scatter.Batch`), not one per weight. One direction's undo
        writes the other's values at the same positions: the same batch."""
        def writes(sw: _Switch) -> Batch:
            return Batch([(self.live[n].array.reshape(-1), p.union, p.vals, self.live[n].packed)
                          for n, p in sw.plans.items()])

        to_b, to_a = writes(fwd), writes(rev)
        fwd.batch, rev.batch = (to_b, to_a), (to_a, to_b)

    def _combine(self, adapters: list[tuple[PreparedAdapter, float]]) -> dict[str, _Combined]:
        parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        combined: dict[str, _Combined] = {}
        for prep, scale in adapters:
            for name, arr in prep.head.items():  # the first adapter with a head supplies it
                c = combined.setdefault(name, _Combined())
                if c.head is None:
                    c.head = arr
            s = np.float32(scale)
            for name, t in prep.targets.items():
                c = combined.setdefault(name, _Combined())
                if t.idx is not None:
                    parts.setdefault(name, []).append((t.idx, s * t.val))
                else:
                    c.B.append(s * t.B)
                    c.A.append(t.A)
        for name, ps in parts.items():
            c = combined[name]
            if len(ps) == 1:
                c.idx, c.delta = ps[0]
            else:
                idx, inv = np.unique(np.concatenate([p[0] for p in ps]), return_inverse=True)
                delta = np.zeros(idx.size, dtype=np.float32)
                np.add.at(delta, inv, np.concatenate([p[1] for p in ps]))
                c.idx, c.delta = idx, delta
        return combined

    def _plan(self, adapters: list[tuple[PreparedAdapter, float]]) -> dict[str, _Plan]:
        combined = self._combine(adapters)
        plans: dict[str, _Plan] = {}
        for name in sorted(set(combined) | set(self._sparse) | set(self._dense)):
            c = combined.get(name, _Combined())
            lw = self.live[name]
            if c.B or c.head is not None or name in self._dense:
                plans[name] = self._plan_dense(name, lw, c)
            else:
                plans[name] = self._plan_sparse(name, lw, c)
        return plans

    def _plan_sparse(self, name: str, lw: LiveWeight, c: _Combined) -> _Plan:
        cur_idx, cur_base = self._sparse.get(name, (_EMPTY_IDX, np.zeros(0, lw.dtype)))
        new_idx = c.idx if c.idx is not None else _EMPTY_IDX
        union, cur_pos, new_pos = merge_sorted(cur_idx, new_idx)
        old = lw.gather(union)  # a copy: the values now, kept to undo a failed commit
        base = old.copy()  # base wherever the weight is untouched
        base[cur_pos] = cur_base
        vals = base.copy()
        new_base = base[new_pos]
        saturated = 0
        if new_idx.size and lw.codes is not None:
            vals[new_pos], clamped = _requantize(lw, new_idx, new_base, c.delta, name)
            saturated = int(clamped.sum())
        elif new_idx.size:
            vals[new_pos] = (new_base.astype(np.float32) + c.delta).astype(vals.dtype)
            _check_finite_result(vals[new_pos], name)
        state = (new_idx, new_base) if new_idx.size else None
        return _Plan(union=union, vals=vals, full=None, sparse_state=state, dense_state=None,
                     old=old, saturated=saturated)

    def _plan_dense(self, name: str, lw: LiveWeight, c: _Combined) -> _Plan:
        if name in self._dense:
            original = self._dense[name]
        else:
            original = lw.read()
            if name in self._sparse:
                idx, base = self._sparse[name]
                original.reshape(-1)[idx] = base
        saturated = 0
        if c.head is not None:
            new = c.head.astype(original.dtype)
        elif c.B:
            B = np.concatenate(c.B, axis=1)
            A = np.concatenate(c.A, axis=0)
            delta = A.T @ B.T if lw.layout == TRANSPOSED else backend_view(B @ A, lw.layout)
            if lw.codes is not None:  # the dense delta and any sparse one, rounded once
                flat = np.ascontiguousarray(delta, dtype=np.float32).reshape(-1)
                if c.idx is not None and c.idx.size:
                    np.add.at(flat, c.idx, c.delta)
                every = np.arange(flat.size, dtype=np.int64)
                codes, clamped = _requantize(lw, every, original.reshape(-1), flat, name)
                return _Plan(union=None, vals=None, full=codes.reshape(original.shape),
                             sparse_state=None, dense_state=original,
                             saturated=int(clamped.sum()))
            new = (original.astype(np.float32) + delta).astype(original.dtype)
        else:
            new = original.copy()
        sparse_state = None
        if c.idx is not None and c.idx.size and lw.codes is not None:
            flat_new = new.reshape(-1)
            flat_new[c.idx], clamped = _requantize(lw, c.idx, flat_new[c.idx], c.delta, name)
            saturated = int(clamped.sum())
            sparse_state = (c.idx, original.reshape(-1)[c.idx])
        elif c.idx is not None and c.idx.size:
            flat_new, flat_orig = new.reshape(-1), original.reshape(-1)
            flat_new[c.idx] = (flat_new[c.idx].astype(np.float32) + c.delta).astype(new.dtype)
            if not c.B:
                sparse_state = (c.idx, flat_orig[c.idx])
        if lw.codes is None:
            _check_finite_result(new, name)
        dense_state = original if (c.B or c.head is not None) else None
        return _Plan(union=None, vals=None, full=new, sparse_state=sparse_state,
                     dense_state=dense_state, saturated=saturated)

    # -- writing ---------------------------------------------------------------------------

    def _write(self, sw: _Switch) -> dict[str, np.ndarray]:
        """Write every plan; returns copies of the densely rewritten arrays (sparse plans carry
        their old values)."""
        if sw.scatter is not None:
            self._span_scatter(sw.scatter[0], sw.scatter[1])
            return {}
        if sw.batch is not None:
            sw.batch[0](self.native_scatter, self.write_threads)
            return {}
        undo: dict[str, np.ndarray] = {}
        for name, plan in sw.plans.items():
            lw = self.live[name]
            if plan.full is None:
                lw.scatter(plan.union, plan.vals, self.native_scatter)
            else:
                undo[name] = lw.read()
                lw.write(plan.full)
        return undo

    def _write_back(self, sw: _Switch, undo: dict[str, np.ndarray]) -> None:
        if sw.scatter is not None:
            self._span_scatter(sw.scatter[0], sw.scatter[2])
            return
        if sw.batch is not None:
            sw.batch[1](self.native_scatter, self.write_threads)
            return
        for name, plan in sw.plans.items():
            if plan.full is None:
                self.live[name].scatter(plan.union, plan.old, self.native_scatter)
            else:
                self.live[name].write(undo[name])

    def _span_scatter(self, pos: np.ndarray, vals: np.ndarray) -> None:
        """``span[pos] = vals`` over the live weights' one span (:func:`_code_span`)."""
        span, _, packed = self._span
        (scatter_nibbles if packed else scatter)(span, pos, vals, self.native_scatter,
                                                 self.write_threads)


_EMPTY_IDX = np.zeros(0, dtype=np.int64)


def _cpus() -> int:
    """The CPUs this process may run on (all of them where the OS does not say)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


def _code_span(live: dict[str, LiveWeight]) -> tuple[np.ndarray, dict[str, int], bool] | None:
    """(the live arrays' one span, each weight's element offset in it, whether it packs int4
    codes two per byte) where :func:`~edgeadapt.runtime.pages.one_span` finds one; None
    otherwise. Packed arrays (:mod:`edgeadapt.format.nibbles`) count their offsets in codes,
    which the nibble scatter's arithmetic takes where each array starts on a packed row (16
    bytes): a weight's code position ``p`` is span position ``offset + p``."""
    found = one_span({name: lw.array for name, lw in live.items()})
    if found is None:
        return None
    span, offsets = found
    packed = {lw.packed for lw in live.values() if lw.array.size}
    if packed != {True}:
        return (span, offsets, False) if packed == {False} else None
    if any(off % nibbles.HALF for off in offsets.values()):
        return None
    return span, {name: nibbles.PER_BYTE * off for name, off in offsets.items()}, True
#: switch plans kept (each pair of adapter sets: 16 bytes per position of the pair's union)
PLAN_CACHE = 4


def merge_sorted(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Union of two sorted, duplicate-free int64 arrays and where each element of ``a`` and of
    ``b`` lands in it: ``union[pos_a] == a``, ``union[pos_b] == b``.

    A stable argsort of the concatenation is timsort, linear for two sorted runs (np.union1d
    hashes and re-sorts, ~10x slower here).
    """
    if not a.size:
        return b, _EMPTY_IDX, np.arange(b.size, dtype=np.int64)
    if not b.size:
        return a, np.arange(a.size, dtype=np.int64), _EMPTY_IDX
    cat = np.concatenate([a, b])
    order = np.argsort(cat, kind="stable")
    s = cat[order]
    keep = np.empty(s.size, dtype=bool)
    keep[0] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    pos = np.empty(cat.size, dtype=np.int64)
    pos[order] = np.cumsum(keep) - 1
    return s[keep], pos[: a.size], pos[a.size:]


def _requantize(lw: LiveWeight, idx: np.ndarray, codes: np.ndarray, delta: np.ndarray,
                name: str) -> tuple[np.ndarray, np.ndarray]:
    """New codes of a quantized weight's entries at backend ``idx`` (now ``codes``) after
    adding ``delta`` on its own scales (:meth:`edgeadapt.format.quant.Grid.requantize`), and
    the mask of those clamped to the code range; SwitchError if a value is not finite."""
    scales = lw.entry_scales(idx)
    _check_finite_result(codes.astype(np.float32) * scales + delta, name)
    return lw.codes.grid.requantize(codes, scales, delta)


def _check_finite_result(vals: np.ndarray, name: str) -> None:
    if not np.isfinite(vals).all():
        raise SwitchError(f"weight {name!r}: the adapted values overflow (inf/NaN); lower the "
                          "scale")
