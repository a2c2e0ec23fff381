"""The runtime's readers-writer lock: phase-fair admission (neither back-to-back switches nor a
stream of runs starves the other), the epoch, and the time a writer waited for the runs in
flight and held the lock (``last_exclusive``), on real threads with events deciding the order
(no timing assumption but lower bounds; a deadline where a starved thread would hang)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from edgeadapt.runtime.locks import ReadWriteLock

DEADLINE_S = 10.0


def wait_until(done: Callable[[], bool]) -> None:
    end = time.monotonic() + DEADLINE_S
    while not done():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.001)


def test_writer_waits_for_runs_in_flight_and_new_runs_wait_for_it():
    lock = ReadWriteLock()
    inside, release, order = threading.Event(), threading.Event(), []

    def run(name: str, hold: threading.Event | None) -> None:
        with lock.shared():
            order.append(name)
            if hold is not None:
                inside.set()
                hold.wait()

    first = threading.Thread(target=run, args=("run1", release))
    first.start()
    inside.wait()

    def write() -> None:
        with lock.exclusive():
            order.append("write")
            time.sleep(0.02)

    writer = threading.Thread(target=write)
    writer.start()
    while not lock._writers_waiting:  # the writer queued behind run1
        time.sleep(0.001)
    late = threading.Thread(target=run, args=("run2", None))
    late.start()
    time.sleep(0.05)  # run1 still holds the lock: run2 must be waiting behind the writer
    assert order == ["run1"] and lock.epoch == 0
    release.set()
    for t in (first, writer, late):
        t.join()
    assert order == ["run1", "write", "run2"] and lock.epoch == 1
    wait_s, held_s = lock.last_exclusive
    assert wait_s >= 0.05 and 0.02 <= held_s < wait_s


def test_optimistic_runs_never_hold_a_writer_off_and_see_it_came():
    lock = ReadWriteLock()
    with lock.optimistic() as window:
        assert window.epoch == 0 and window.intact()
        done = threading.Event()

        def write() -> None:
            with lock.exclusive():
                pass
            done.set()

        threading.Thread(target=write).start()
        assert done.wait(10)  # the writer did not wait for this run
        assert not window.intact() and lock.epoch == 1
    # a write in progress: an optimistic run starts only after it
    entered, release, order = threading.Event(), threading.Event(), []

    def long_write() -> None:
        with lock.exclusive():
            entered.set()
            release.wait()
            order.append("write")

    writer = threading.Thread(target=long_write)
    writer.start()
    entered.wait()

    def run() -> None:
        with lock.optimistic() as w:
            order.append(("run", w.epoch))

    reader = threading.Thread(target=run)
    reader.start()
    time.sleep(0.05)
    assert order == []
    release.set()
    writer.join()
    reader.join()
    assert order == ["write", ("run", 2)]
    with lock.shared() as w:
        assert w.epoch == 2 and w.intact()


def test_a_write_cancels_the_optimistic_runs_in_flight_once():
    """Hooks of open windows are called as the exclusive section begins (before its body),
    once; a hook given to a window already torn is called at once; a closed window's hooks
    and a shared run's are never called."""
    lock = ReadWriteLock()
    calls = []
    with lock.optimistic() as done:
        done.on_cancel(lambda: calls.append("closed"))
    with lock.exclusive():  # no window open: nothing cancelled
        pass
    assert calls == []
    with lock.optimistic() as window:
        window.on_cancel(lambda: calls.append("a"))
        window.on_cancel(lambda: calls.append("b"))
        seen = []

        def write() -> None:
            with lock.exclusive():
                seen.append(list(calls))  # the hooks ran before the write's body

        t = threading.Thread(target=write)
        t.start()
        t.join(10)
        assert seen == [["a", "b"]] and calls == ["a", "b"]
        window.on_cancel(lambda: calls.append("late"))  # torn already: called now
        assert calls == ["a", "b", "late"]
        with lock.exclusive():  # a second write does not call them again
            pass
        assert calls == ["a", "b", "late"]


def test_a_cancel_hook_may_pause_and_is_resumed_after_the_write():
    """A hook that returns a resume (a run paused, not stopped: ExecuTorch's runner) has it
    called once the write's body is over, before the runs are let in; a window torn already
    pauses and resumes at once."""
    lock = ReadWriteLock()
    calls = []

    def pause() -> Callable[[], None]:
        calls.append("pause")
        return lambda: calls.append("resume")

    with lock.optimistic() as window:
        window.on_cancel(pause)

        def write() -> None:
            with lock.exclusive():
                calls.append("write")

        t = threading.Thread(target=write)
        t.start()
        t.join(10)
        assert calls == ["pause", "write", "resume"]
        window.on_cancel(pause)  # torn already
        assert calls[3:] == ["pause", "resume"]


def test_runs_waiting_when_a_write_ends_go_before_the_switch_queued_behind_it():
    """write1 writes; write2 queues; then a run arrives and waits behind both. As write1 ends
    the run is admitted, ahead of write2, which waits for it (writer preference let write2 in
    first)."""
    lock = ReadWriteLock()
    order: list[str] = []
    writing, end_write, running, end_run = (threading.Event() for _ in range(4))

    def write(name: str, hold: bool) -> None:
        with lock.exclusive():
            order.append(name)
            if hold:
                writing.set()
                end_write.wait()

    def run() -> None:
        with lock.shared():
            order.append("run")
            running.set()
            end_run.wait()

    first = threading.Thread(target=write, args=("write1", True))
    second = threading.Thread(target=write, args=("write2", False))
    reader = threading.Thread(target=run)
    try:
        first.start()
        assert writing.wait(DEADLINE_S)
        second.start()
        wait_until(lambda: lock._writers_waiting == 1)
        reader.start()
        wait_until(lambda: lock._readers_waiting == 1)
        end_write.set()
        assert running.wait(DEADLINE_S), f"the run did not get in: {order}"
        time.sleep(0.05)  # write2 is awake: it must still be waiting for the run
        assert order == ["write1", "run"]
    finally:  # no thread left waiting on an event, whatever failed
        end_write.set()
        end_run.set()
        for t in (first, second, reader):
            if t.is_alive():
                t.join()
    assert order == ["write1", "run", "write2"] and lock.epoch == 2


def test_back_to_back_switches_do_not_starve_a_waiting_run():
    """The starvation writer preference allowed: one thread re-enters ``exclusive`` as soon as
    it leaves (its write releases the GIL, as the native scatter does), so under writer
    preference it was queued again before the run it woke got the lock, every time. Phase-fair:
    each write's end admits the waiting run. The switching stops at the deadline, so a starved
    run fails the test instead of hanging it."""
    lock = ReadWriteLock()
    stop, done = threading.Event(), threading.Event()

    def switcher() -> None:
        while not stop.is_set():
            with lock.exclusive():
                time.sleep(0.001)

    def runs() -> None:
        for _ in range(20):
            with lock.shared():
                pass
        done.set()

    threads = [threading.Thread(target=switcher), threading.Thread(target=runs)]
    for t in threads:
        t.start()
    finished = done.wait(DEADLINE_S)
    stop.set()
    for t in threads:
        t.join()
    assert finished, f"20 runs did not get in within {DEADLINE_S} s of back-to-back switches"


def test_a_stream_of_overlapping_runs_does_not_starve_switches():
    """Four threads keep the lock held shared without a gap (each run holds it 2 ms); a
    switch still gets in every time, and the runs go on between the switches."""
    lock = ReadWriteLock()
    stop, done = threading.Event(), threading.Event()
    runs = [0] * 4

    def reader(k: int) -> None:
        while not stop.is_set():
            with lock.shared():
                time.sleep(0.002)
            runs[k] += 1

    def switches() -> None:
        for _ in range(20):
            with lock.exclusive():
                pass
        done.set()

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    wait_until(lambda: min(runs) > 0)
    writer = threading.Thread(target=switches)
    writer.start()
    finished = done.wait(DEADLINE_S)
    stop.set()
    for t in (*threads, writer):
        t.join()
    assert finished and lock.epoch == 20, f"{lock.epoch} of 20 switches within {DEADLINE_S} s"


def test_a_shared_runs_cancel_hook_is_never_called():
    """A shared run holds writes off, so its window is never torn while open: its hook is
    dropped (not called by a later write, nor at once)."""
    lock = ReadWriteLock()
    calls = []
    with lock.shared() as window:
        window.on_cancel(lambda: calls.append("shared"))
    with lock.exclusive():
        pass
    assert calls == [] and not window.intact()
