"""The concurrency harness every switch test shares (numpy only, no torch)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def runs_while_switching(run: Callable[[], np.ndarray], switch: Callable[[Any], None],
                         states: Sequence[Any], readers: int, switches: int, seed: int,
                         min_runs: int = 0, deadline_s: float = 120.0
                         ) -> tuple[list[Exception], list[np.ndarray]]:
    """``readers`` threads call ``run()`` in a loop while this thread makes switches to states
    drawn uniformly (``np.random.default_rng(seed)``) from ``states``: at least ``switches`` of
    them, and on until the readers have finished ``min_runs`` runs in all (so a check on the
    outputs is never vacuous however the threads are scheduled), or until ``deadline_s`` has
    passed or a reader has failed. Returns the readers' exceptions and every output they saw."""
    errors: list[Exception] = []
    outputs: list[np.ndarray] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                outputs.append(run())
        except Exception as exc:  # pragma: no cover - reported by the caller's assert
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(readers)]
    for t in threads:
        t.start()
    rng = np.random.default_rng(seed)
    end = time.monotonic() + deadline_s
    done = 0
    try:
        while done < switches or (len(outputs) < min_runs and not errors
                                  and time.monotonic() < end):
            switch(states[int(rng.integers(len(states)))])
            done += 1
            if done >= switches:  # the readers lag behind back-to-back switches: let them in
                time.sleep(0.001)
    finally:
        stop.set()
        for t in threads:
            t.join()
    return errors, outputs


def device_hashes(rt) -> dict[str, str]:
    """sha256 of every device buffer of a Runtime on ``OrtDeviceStore``."""
    import hashlib

    return {n: hashlib.sha256(rt.store.device_array(n).tobytes()).hexdigest()
            for n in rt.store.live_weights()}
