"""The one lock of a runtime: many concurrent runs, one switch at a time, no run while a switch
writes, and runs and switches admitted in turns (phase-fair), so neither back-to-back switches
nor a stream of runs can keep the other out; and optimistic runs, which never hold a switch off
but learn afterwards whether one began under them."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from edgeadapt.timer import stopwatch

#: a cancel hook: stops a run whose result a write voids; it may return a resume, called
#: once the write is over (a run that can be paused but not abandoned: ExecuTorch's)
Cancel = Callable[[], Callable[[], None] | None]


class Window:
    """A run's view of the lock (:meth:`ReadWriteLock.shared`, :meth:`ReadWriteLock.optimistic`).
    ``keep(window, cancel)``: the lock's registration of a cancel hook, which holds the hooks
    (False where the window is torn already)."""

    def __init__(self, lock: ReadWriteLock, epoch: int,
                 keep: Callable[[Window, Cancel], bool]) -> None:
        self._lock, self.epoch, self._keep = lock, epoch, keep

    def intact(self) -> bool:
        """No exclusive section has begun since the run started (the epoch moves as one
        begins, before it writes)."""
        return self._lock.epoch == self.epoch

    def on_cancel(self, cancel: Cancel) -> None:
        """Have ``cancel`` called (once, from the switching thread) when an exclusive section
        begins while this window is open: the run's result is lost anyway, so stopping it
        early hands its cores to the write (e.g. ONNX Runtime's ``RunOptions.terminate``).
        A resume it returns is called when the write ends (ExecuTorch's runs pause instead:
        they cannot be abandoned part way). A window torn already calls it now (and its
        resume at once); a shared run's window (never torn while open) never does."""
        if not self._keep(self, cancel):
            resume = cancel()
            if resume is not None:
                resume()


class ReadWriteLock:
    """Runs hold the lock :meth:`shared`; a switch holds :meth:`update` from start to end (one
    switch at a time; runs go on while it reads and plans) and :meth:`exclusive` inside it for
    the write and commit (no run in between).

    Phase-fair admission: runs and writes alternate in phases, R* W R* W ... A run enters at
    once unless a switch writes or waits. When a write ends, every run waiting at that moment
    is admitted as one phase (counted as holding the lock before any switch can look), so a
    switch queued behind the write waits for that phase; a run arriving after it waits behind
    the queued switch. Hence a waiting run is held off by at most the phase in progress and one
    write, and a waiting switch by at most one phase of runs per switch queued ahead of it
    (none in a runtime, whose switches queue on ``update``): back-to-back switches cannot
    starve the runs, nor a steady stream of runs a switch. ``shared`` and ``exclusive`` are
    not re-entrant; ``update`` is, for the thread holding it (the runtime's switch holds it
    around the engine's).

    ``epoch`` counts the exclusive sections entered so far: read while holding ``shared`` it
    names the weight state the run sees (a KV cache built under another epoch is stale). An
    exclusive section, as it begins, calls the cancel hooks of the optimistic runs in flight
    (:meth:`Window.on_cancel`), so the write does not share the cores with work it voids.
    ``last_exclusive`` is (seconds the last exclusive section waited for the runs in flight,
    seconds it was held): what a switch cost the runs, apart from what the runs cost it.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0  # runs holding the lock, or admitted by a write's end to hold it
        self._readers_waiting = 0  # runs waiting for a write (in progress or queued) to end
        self._writes_ended = 0  # a waiting run that sees it move has been admitted
        self._writer = False
        self._writers_waiting = 0
        self._update = threading.RLock()
        self._hooks: dict[Window, list[Cancel]] = {}  # open optimistic windows' cancel hooks
        self.epoch = 0
        self.last_exclusive: tuple[float, float] | None = None

    @contextmanager
    def shared(self) -> Iterator[Window]:
        """A run that holds writers off; yields a :class:`Window` (intact throughout)."""
        with self._cond:
            self._enter_run()
            window = Window(self, self.epoch, self._keep_cancel)
        try:
            yield window
        finally:
            with self._cond:
                self._leave_run()

    def _enter_run(self) -> None:
        """Count a run in (``_cond`` held): at once while no switch writes or waits, else when
        the write in progress or queued ends (its end counts the run in) or the switch
        queued gives up waiting."""
        if not (self._writer or self._writers_waiting):
            self._readers += 1
            return
        seen = self._writes_ended
        self._readers_waiting += 1
        try:
            while self._writes_ended == seen and (self._writer or self._writers_waiting):
                self._cond.wait()
        except BaseException:
            if self._writes_ended == seen:
                self._readers_waiting -= 1
            else:  # counted in already: give the place back
                self._leave_run()
            raise
        if self._writes_ended == seen:  # no write ended: the switch waited for gave up
            self._readers_waiting -= 1
            self._readers += 1

    def _leave_run(self) -> None:
        self._readers -= 1
        if self._readers == 0:
            self._cond.notify_all()

    def _keep_cancel(self, window: Window, cancel: Cancel) -> bool:
        """Keep ``cancel`` for the next exclusive section if ``window`` is open optimistically
        and intact (dropped for an intact window not open optimistically); False where the
        window is torn already, for the caller to cancel at once."""
        with self._cond:
            if window.epoch != self.epoch:
                return False
            hooks = self._hooks.get(window)
            if hooks is not None:
                hooks.append(cancel)
            return True

    @contextmanager
    def optimistic(self) -> Iterator[Window]:
        """A run that does not hold writers off (a seqlock's reader): waits for a write in
        progress to end, then yields a :class:`Window` whose ``epoch`` is the weight state the
        run started under and whose ``intact()`` stays True while no exclusive section has
        begun since. A run for which ``intact()`` is False after it may have read weights half
        written: its results are to be discarded (and redone)."""
        with self._cond:
            while self._writer:
                self._cond.wait()
            window = Window(self, self.epoch, self._keep_cancel)
            self._hooks[window] = []
        try:
            yield window
        finally:
            with self._cond:
                del self._hooks[window]

    @contextmanager
    def update(self) -> Iterator[None]:
        with self._update:
            yield

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        waited = stopwatch()
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            except BaseException:
                self._writers_waiting -= 1
                self._cond.notify_all()  # the runs it held back may enter now
                raise
            self._writers_waiting -= 1
            self._writer = True
            self.epoch += 1
            cancels = [c for hooks in self._hooks.values() for c in hooks]
            for hooks in self._hooks.values():
                hooks.clear()
        # the optimistic runs in flight are torn now: stop (or pause) them
        resumes = [r for r in (cancel() for cancel in cancels) if r is not None]
        wait_s, held = waited(), stopwatch()
        try:
            yield
        finally:
            for resume in resumes:  # paused runs go on (to be discarded and redone)
                resume()
            with self._cond:
                self._writer = False
                # the runs waiting now are the next phase, ahead of any switch waiting
                self._readers += self._readers_waiting
                self._readers_waiting = 0
                self._writes_ended += 1
                self.last_exclusive = (wait_s, held())
                self._cond.notify_all()
