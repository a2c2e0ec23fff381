"""The runtime's readers-writer lock: writer preference, the epoch, and the time a writer
waited for the runs in flight and held the lock (``last_exclusive``), on real threads with
events deciding the order (no timing assumption but lower bounds)."""

from __future__ import annotations

import threading
import time

from edgeadapt.runtime.locks import ReadWriteLock


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
