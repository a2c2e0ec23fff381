"""How a reply's next token is drawn from the logits (numpy only): greedy, or temperature with
top-k / top-p (nucleus) filtering from a seeded generator, optionally constrained to a set of
tokens; the options checked once (:meth:`Sampling.checked`, ConfigError naming the option)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from edgeadapt.errors import ConfigError


@dataclass(frozen=True)
class Sampling:
    """How a reply is drawn; :meth:`checked` validates every field (ConfigError).

    max_new_tokens: the most tokens of the reply (>= 1). temperature: 0 = greedy (argmax),
    else logits / temperature. top_k: keep the k most likely tokens (None: all). top_p: keep
    the smallest set whose probability reaches top_p (None or 1: all). seed: the random
    generator's seed (None: fresh entropy). stop: strings that end the reply (not included in
    its text). allowed: the only token ids that may be drawn (constrained decoding, e.g. a
    label set: greedy then picks the likeliest of them); None: all.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    allowed: tuple[int, ...] | None = None

    @classmethod
    def checked(cls, max_new_tokens: object = 64, temperature: object = 0.0,
                top_k: object = None, top_p: object = None, seed: object = None,
                stop: object = None, allowed: object = None) -> Sampling:
        if not _whole(max_new_tokens) or max_new_tokens < 1:
            raise ConfigError(f"generate: max_new_tokens={max_new_tokens!r}; a whole number >= 1")
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
                or not math.isfinite(temperature) or temperature < 0:
            raise ConfigError(f"generate: temperature={temperature!r}; a finite number >= 0 "
                              "(0: greedy)")
        if top_k is not None and (not _whole(top_k) or top_k < 1):
            raise ConfigError(f"generate: top_k={top_k!r}; a whole number >= 1, or None")
        if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, numbers.Real)
                                  or not 0 < top_p <= 1):
            raise ConfigError(f"generate: top_p={top_p!r}; a number in (0, 1], or None")
        if seed is not None and (not _whole(seed) or seed < 0):
            raise ConfigError(f"generate: seed={seed!r}; a whole number >= 0, or None")
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if not all(isinstance(s, str) and s for s in stops):
            raise ConfigError(f"generate: stop={stop!r}; a non-empty string or a list of them")
        if allowed is not None:
            ids = list(allowed) if isinstance(allowed, list | tuple | range) else None
            if not ids or not all(_whole(i) and i >= 0 for i in ids):
                raise ConfigError(f"generate: allowed={allowed!r}; a non-empty list of token "
                                  "ids, or None")
            allowed = tuple(sorted({int(i) for i in ids}))
        return cls(int(max_new_tokens), float(temperature),
                   None if top_k is None else int(top_k),
                   None if top_p is None else float(top_p),
                   None if seed is None else int(seed), stops, allowed)


def _whole(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def sample(logits: np.ndarray, how: Sampling, rng: np.random.Generator) -> int:
    """One token id from ``logits`` (vocab,): the argmax at temperature 0 (the first of equal
    maxima, as torch's argmax), else a draw from softmax(logits / temperature) restricted to
    the ``top_k`` most likely tokens, then to the smallest set reaching ``top_p`` (the most
    likely token always stays); with ``allowed``, every other token is out first."""
    if how.allowed is not None:
        masked = np.full(logits.shape, -np.inf, dtype=np.float64)
        masked[list(how.allowed)] = logits[list(how.allowed)]
        logits = masked
    if how.temperature == 0:
        return int(np.argmax(logits))
    x = logits.astype(np.float64) / how.temperature
    if how.top_k is not None and how.top_k < x.size:
        kth = np.partition(x, -how.top_k)[-how.top_k]
        x = np.where(x >= kth, x, -np.inf)
    p = np.exp(x - x.max())
    p /= p.sum()
    if how.top_p is not None and how.top_p < 1:
        order = np.argsort(-p, kind="stable")
        before = np.cumsum(p[order]) - p[order]  # probability of the tokens ranked above
        keep = np.zeros_like(p, dtype=bool)
        keep[order[before < how.top_p]] = True
        p = np.where(keep, p, 0.0)
        p /= p.sum()
    return int(rng.choice(p.size, p=p))
