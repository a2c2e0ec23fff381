"""What every generating case offers the timings (:class:`DecodeCase`), and edgeadapt's own:
a loaded runtime driven through its public API (:class:`RuntimeCase`), so the rows time what
users get.

Token ids in, token ids out; a prompt is a 1-D int64 array. The timed streams never end on an
end-of-turn token (:func:`ignore_end_of_turn`), as ``ignore_eos`` in other LLM benchmarks: every
series decodes exactly the steps it is asked for, whatever the model would have said.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from edgeadapt.runtime import Runtime

Step = Callable[[], object]


class DecodeCase(Protocol):
    """One case of the generation rows: a runtime with an adapter applied, or a peer."""

    def greedy(self, prompt: np.ndarray, n: int) -> list[int]:
        """The ``n`` greedy tokens after ``prompt`` (fewer where a peer stops on its end-of-turn
        token; the last one is that token)."""

    def first_token(self, prompt: np.ndarray) -> object:
        """A fresh request: prefill ``prompt`` and draw the first token (the time to the first
        token, what one call of it costs)."""

    def decoder_at(self, prompt: np.ndarray, steps: int) -> Step:
        """A conversation that has read ``prompt`` and drawn its first token (untimed); each
        call of the returned function is one decode step: the previous token fed, the next one
        drawn. Good for ``steps`` calls."""


def ignore_end_of_turn(rt: Runtime) -> None:
    """Make ``rt``'s replies run to ``max_new_tokens`` (its in-memory manifest's end-of-turn
    tokens emptied; the bundle on disk untouched). Call it before ``rt`` first generates: the
    decoder reads the manifest once, when it opens."""
    section = dict(rt.manifest.extra["generate"])
    section["eos_token_ids"] = []
    rt.manifest.extra["generate"] = section


class RuntimeCase:
    """An edgeadapt runtime as it is (adapters switched in beforehand), generating greedily
    through ``rt.generate`` / ``rt.stream``. ``rt`` must ignore end-of-turn tokens
    (:func:`ignore_end_of_turn`)."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def greedy(self, prompt: np.ndarray, n: int) -> list[int]:
        return list(self.rt.generate(prompt, max_new_tokens=n).ids)

    def first_token(self, prompt: np.ndarray) -> object:
        return next(iter(self.rt.stream(prompt, max_new_tokens=1)))

    def decoder_at(self, prompt: np.ndarray, steps: int) -> Step:
        pieces = iter(self.rt.stream(prompt, max_new_tokens=steps + 1))
        next(pieces)  # the prefill and the first token
        return lambda: next(pieces)
