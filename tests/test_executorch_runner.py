"""edgeadapt's native ExecuTorch runner (``kernels/et_runner.cpp`` through
``backends/executorch/native_runner.py``) on a small program of its own: a Python thread makes
progress while a run goes on (the GIL is released), where ExecuTorch's Python runtime, the
negative control, holds it for the whole run; the outputs equal the Python runtime's bit for
bit; refusals are BundleErrors. The runner on the bundles' real programs (XNNPACK, the own
kernel, forward and decode, switches): tests/test_generate_executorch.py."""

from __future__ import annotations

import ctypes
import os
import threading
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("executorch")

from edgeadapt.errors import BundleError, ConfigError  # noqa: E402
from edgeadapt.runtime.backends.executorch import programs  # noqa: E402

N, CHAIN = 256, 48  # (N x N) @ (N x N), CHAIN times: a run of tens of milliseconds


class Chain(torch.nn.Module):
    """``x <- tanh(x @ w)`` CHAIN times, plus a mutable buffer ``shift`` added at the end."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(N, N) / N ** 0.5)
        self.register_buffer("shift", torch.zeros(N))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(CHAIN):
            x = torch.tanh(x @ self.w)
        self.shift.add_(0.0)  # mutated: planned memory, named (get_attribute)
        return x + self.shift


@pytest.fixture(scope="module")
def blob() -> bytes:
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower

    if programs.runner_unavailable() is not None:
        pytest.skip(f"native runner unavailable: {programs.runner_unavailable()}")
    ep = torch.export.export(Chain().eval(), (torch.randn(N, N),), strict=False)
    edge = to_edge_transform_and_lower(ep, partitioner=[])
    return bytes(edge.to_executorch(ExecutorchBackendConfig(emit_mutable_buffer_names=True))
                 .buffer)


def _busiest_gap(method, x: np.ndarray) -> float:
    """The longest time a counting thread went without a step during one run of ``method``,
    as a fraction of the run: a thread that needs the GIL stalls for the whole of a run that
    holds it."""
    stamps: list[float] = []
    stop = threading.Event()

    def count() -> None:
        while not stop.is_set():
            stamps.append(time.perf_counter())
            time.sleep(0.0002)  # releases the GIL; waking needs it back

    counter = threading.Thread(target=count)
    counter.start()
    time.sleep(0.01)
    start = time.perf_counter()
    method.execute([x])
    end = time.perf_counter()
    stop.set()
    counter.join()
    inside = [start] + [t for t in stamps if start < t < end] + [end]
    return max(b - a for a, b in zip(inside, inside[1:], strict=False)) / (end - start)


def test_a_run_releases_the_gil_and_equals_the_python_runtime(blob):
    """The runner: a counting thread steps all through a run (its longest stall is under half
    of it; best of three, a loaded machine may deschedule it). The Python runtime on the same
    program: the thread stalls for nearly all of the run. The outputs are the same bits."""
    x = np.random.default_rng(0).standard_normal((N, N)).astype(np.float32)
    native = programs.open_program(blob, "chain.pte", native=True)
    python = programs.open_program(blob, "chain.pte", native=False)
    assert (native.releases_gil, python.releases_gil) == (True, False)
    runner, control = native.method("forward"), python.method("forward")
    assert min(_busiest_gap(runner, x) for _ in range(3)) < 0.5
    assert _busiest_gap(control, x) > 0.8
    got, want = runner.execute([x])[0], control.execute([x])[0]
    assert got.dtype == want.dtype == np.float32 and np.array_equal(got, want)
    with torch.no_grad():
        assert np.allclose(got, Chain()(torch.from_numpy(x)).numpy(), atol=1e-5)


def test_a_held_program_pauses_its_runs_until_every_hold_is_released(blob):
    """A switch voiding a run holds its program (native_runner.RunnerProgram.hold): the run
    stops before its next instruction, here its first, while any hold stands (holds nest;
    a release counts once), then goes on to the result an unheld run gives."""
    program = programs.open_program(blob, "chain.pte", native=True)
    method = program.method("forward")
    x = np.random.default_rng(0).standard_normal((N, N)).astype(np.float32)
    want = method.execute([x])[0]
    first, second = program.hold(), program.hold()
    out = []
    t = threading.Thread(target=lambda: out.append(method.execute([x])[0]))
    t.start()
    t.join(0.5)  # an unheld run takes tens of milliseconds
    assert t.is_alive()
    first()
    first()  # released once only
    t.join(0.5)
    assert t.is_alive()
    second()
    t.join(30)
    assert not t.is_alive()
    np.testing.assert_array_equal(out[0], want)
    np.testing.assert_array_equal(method.execute([x])[0], want)  # reset: runs again
    # hold and release are called with the GIL kept (ctypes.PyDLL), as a switch's write
    # section calls them: taking the GIL back from a decoding thread cost switches a slice
    from edgeadapt.runtime.backends.executorch import native_runner

    assert native_runner._HOLD[0]._flags_ & ctypes._FUNCFLAG_PYTHONAPI


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux scheduling policies")
def test_a_run_is_batch_scheduled_and_its_thread_gets_its_policy_back(blob):
    """While a run is in flight its thread is SCHED_BATCH (released by a switch, it does not
    preempt the switch's thread on waking); after the run the thread's own policy is back."""
    program = programs.open_program(blob, "chain.pte", native=True)
    method = program.method("forward")
    x = np.zeros((N, N), np.float32)
    release = program.hold()  # the run parks before its first instruction
    policies = {}

    def run() -> None:
        policies["before"] = os.sched_getscheduler(0)
        method.execute([x])
        policies["after"] = os.sched_getscheduler(0)

    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.2)
    policies["during"] = os.sched_getscheduler(t.native_id)
    release()
    t.join(30)
    assert policies == {"before": os.SCHED_OTHER, "during": os.SCHED_BATCH,
                        "after": os.SCHED_OTHER}


def test_attributes_alias_the_planned_buffer(blob):
    """A write through ``attribute`` is what the next run reads (the live-weight contract);
    the array keeps the program loaded after the program object is dropped."""
    x = np.zeros((N, N), np.float32)
    program = programs.open_program(blob, "chain.pte", native=True)
    method = program.method("forward")
    shift = method.attribute("shift")
    assert shift.shape == (N,) and shift.dtype == np.float32 and shift.flags.writeable
    assert method.attribute("shift").ctypes.data == shift.ctypes.data
    del program
    shift[:] = np.arange(N, dtype=np.float32)
    assert np.array_equal(method.execute([x])[0], np.broadcast_to(shift, (N, N)))


def test_outputs_are_held_for_their_run_until_taken_or_dropped(blob, monkeypatch):
    """A run's outputs stay in the program's memory, the program held for the calling thread,
    until it copies them into its arrays (one copy): another thread's run waits for that
    (its result is its own, not the first run's); where the caller fails before taking them
    (here allocating the arrays), the program is released all the same and runs on. A run
    never taken is dropped by the thread's next run."""
    from edgeadapt.runtime.backends.executorch import native_runner

    rng = np.random.default_rng(3)
    x1, x2 = (rng.standard_normal((N, N)).astype(np.float32) for _ in range(2))
    method = programs.open_program(blob, "chain.pte", native=True).method("forward")
    control = programs.open_program(blob, "chain.pte", native=False).method("forward")
    want1, want2 = control.execute([x1])[0], control.execute([x2])[0]
    lib = native_runner._lib()
    arrays = [np.ascontiguousarray(x1)]

    def start(x: np.ndarray) -> int:
        """et_runner_execute alone (RunnerMethod.execute's first half): the outputs pending"""
        dtypes, ndims = np.array([6], np.int32), np.array([2], np.int32)  # float32, 2-D
        shape = np.array(x.shape, np.int64)
        return lib.et_runner_execute(method.program._handle, method._index, 1,
                                     dtypes.ctypes.data, ndims.ctypes.data, shape.ctypes.data,
                                     (ctypes.c_void_p * 1)(x.ctypes.data))

    assert start(arrays[0]) == 1  # pending: the program is held by this thread
    other: list[np.ndarray] = []
    worker = threading.Thread(target=lambda: other.append(method.execute([x2])[0]))
    worker.start()
    worker.join(0.3)
    assert worker.is_alive() and not other  # waits for the pending outputs to be taken
    out = np.empty((N, N), np.float32)
    assert lib.et_runner_take_outputs(1, (ctypes.c_void_p * 1)(out.ctypes.data)) == 0
    worker.join(30)
    assert np.array_equal(out, want1) and np.array_equal(other[0], want2)
    assert start(arrays[0]) == 1 and start(arrays[0]) == 1  # the first one dropped
    lib.et_runner_release_outputs()

    def no_memory(*args, **kwargs):
        raise MemoryError("test")

    monkeypatch.setattr(native_runner.np, "empty", no_memory)
    with pytest.raises(MemoryError):
        method.execute([x1])
    monkeypatch.undo()
    done: list[np.ndarray] = []
    worker = threading.Thread(target=lambda: done.append(method.execute([x2])[0]))
    worker.start()
    worker.join(30)
    assert done and np.array_equal(done[0], want2)  # released: another thread runs


def test_refusals_are_bundle_errors(blob):
    program = programs.open_program(blob, "chain.pte", native=True)
    method = program.method("forward")
    with pytest.raises(BundleError, match="no mutable buffer 'nope'"):
        method.attribute("nope")
    with pytest.raises(BundleError, match="decode"):
        program.method("decode")
    with pytest.raises(BundleError, match="input 0"):
        method.execute([np.zeros((N, N), np.int64)])  # the method takes float32
    with pytest.raises(BundleError, match="takes 1 inputs"):
        method.execute([])
    with pytest.raises(BundleError, match="damaged.pte"):
        programs.open_program(blob[: len(blob) // 3], "damaged.pte", native=True)
    assert np.array_equal(method.execute([np.zeros((N, N), np.float32)])[0],
                          np.zeros((N, N), np.float32))  # still runs


def test_native_true_where_the_runner_cannot_be_built(blob, monkeypatch):
    """``native=True`` names why the runner is unavailable; None falls back to the Python
    runtime, whose outputs are the same."""
    monkeypatch.setattr(programs, "runner_unavailable", lambda: "no C++ compiler (test)")
    with pytest.raises(ConfigError, match="no C\\+\\+ compiler"):
        programs.open_program(blob, "chain.pte", native=True)
    assert not programs.open_program(blob, "chain.pte").releases_gil
