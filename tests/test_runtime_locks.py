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
