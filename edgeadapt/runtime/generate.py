"""Text generation with a KV cache on a loaded runtime, adapters switched in place between (or
during) replies (numpy only, torch-free; docs/generate.md).

    rt = edgeadapt.runtime.load("bundle/")          # exported with --generate
    rt.switch("poet")
    out = rt.generate("Once upon a time", max_new_tokens=64)      # greedy: temperature 0
    out.text, out.ids, out.finish_reason
    for piece in rt.stream("Hello", max_new_tokens=32, temperature=0.8, top_p=0.9, seed=1):
        print(piece.text, end="", flush=True)
    chat = rt.conversation()                          # several turns, one cache
    chat.send("Hi"); rt.switch("critic"); chat.send("And now?")   # re-prefilled under "critic"

A decode step feeds the new tokens and the cache of the earlier ones to the backend's decoder
(``open_decoder``: ONNX Runtime's is :mod:`edgeadapt.runtime.backends.onnxruntime.decoder`),
whose graph reads the same live buffers the switch engine edits. Each step holds the runtime's
lock shared, so a switch waits for the running step only, and reads the lock's ``epoch``: a
cache built under another weight state is *stale* and is never continued — the conversation's
whole context is fed again (re-prefilled) under the weights in force, before the next token.
A switch during a reply therefore gives the rest of that reply under the new weights, computed
from a cache built entirely under them (``Generation.reprefills`` counts such rebuilds).

While an unfused adapter is active (``rt.route``, a graph variant) a step goes through the
variant's decoder instead (the route's optional ``decoder()``), which reads the same live
buffers and the same branch tensors as the variant's forward graph.

One conversation belongs to one thread at a time; several conversations (each its own cache)
may generate concurrently on one runtime.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from edgeadapt.errors import BundleError, ConfigError, SwitchError
from edgeadapt.format.manifest import Manifest
from edgeadapt.runtime.sampling import Sampling, sample
from edgeadapt.runtime.tokenizer import INCOMPLETE, Detokenizer, Tokenizer

#: prompt tokens fed per step of a prefill: bounds a step's activations, and with them how long
#: a switch waits for a step that holds the lock or shares the cores with its write
PREFILL_CHUNK = 128
#: rebuilds (a switch came during the feeding) after which one call of a conversation feeds
#: the rest under the lock held shared: a switch then waits, the conversation progresses
RESTARTS_BEFORE_HOLDING = 2


class Decoder(Protocol):
    """What a backend's ``open_decoder`` returns: one forward with a KV cache. A cache is an
    object of the backend's own (the conversation only holds it); a step may update it in
    place and return it."""

    def empty_cache(self, batch: int = 1) -> object:
        """The cache of no positions."""

    def step(self, ids: np.ndarray, cache: object, *, keep: int = 0
             ) -> tuple[np.ndarray, object]:
        """Logits (batch, seq, vocab) of ``ids`` (int64 (batch, seq)) after the positions of
        ``cache``, and the cache with ``ids`` appended; with ``keep`` k >= 1 only the last k
        positions' (batch, min(k, seq), vocab), which a decoder should then compute alone."""

    # optional: ``optimistic = True`` where a switch may write the live weights while a step
    # runs without harm beyond the step's own results (no buffer freed, moved or repacked):
    # steps then never hold a switch off, and a step a switch overlapped is redone. Such a
    # decoder's ``step(ids, cache, window)`` takes the run's locks.Window and stops early
    # (raising) once a switch cancels it (Window.on_cancel)


def check_keep(keep: object) -> None:
    """ConfigError unless ``keep`` (a decoder step's: how many of the last positions' logits it
    returns, 0 for all) is a whole number >= 0."""
    if isinstance(keep, bool) or not isinstance(keep, (int, np.integer)) or keep < 0:
        raise ConfigError(f"decoder step: keep {keep!r}; a whole number >= 0 (0: every "
                          "position's logits)")


@dataclass(frozen=True)
class GenerationSpec:
    """The bundle's ``"generate"`` section (written by ``edgeadapt export base --generate``).

    max_context: positions a conversation may hold, prompt and replies together.
    eos_token_ids: tokens that end a reply (the model's generation config). tokenizer,
    chat_template: file names in the bundle, or None.
    """

    max_context: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    tokenizer: str | None
    chat_template: str | None

    @classmethod
    def of(cls, manifest: Manifest) -> GenerationSpec:
        """The spec of a bundle; BundleError for a bundle that cannot generate (not a causal
        LM, or exported without ``--generate``) or a malformed section."""
        if manifest.kind != "causal-lm":
            raise BundleError(f"bundle of {manifest.model!r} is a {manifest.kind}: only causal-LM "
                              "bundles exported with --generate generate text")
        section = manifest.extra.get("generate")
        if not isinstance(section, dict):
            raise BundleError(f"bundle of {manifest.model!r} has no generate section: export it "
                              "with `edgeadapt export base --generate`")
        try:
            spec = cls(int(section["max_context"]), int(section["vocab_size"]),
                       tuple(int(i) for i in section.get("eos_token_ids") or ()),
                       None if section.get("bos_token_id") is None
                       else int(section["bos_token_id"]),
                       section.get("tokenizer"), section.get("chat_template"))
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"bundle.json: generate section is malformed ({exc})") from None
        if spec.max_context < 2 or spec.vocab_size < 1:
            raise BundleError(f"bundle.json: generate section has max_context "
                              f"{spec.max_context}, vocab_size {spec.vocab_size}")
        return spec


class Generator:
    """What every conversation of one runtime shares: the spec, the backend's decoder and the
    tokenizer (None for bundles without one: prompts are token ids then)."""

    def __init__(self, spec: GenerationSpec, decoder: Decoder, tokenizer: Tokenizer | None
                 ) -> None:
        self.spec = spec
        self.decoder = decoder
        self.tokenizer = tokenizer

    def decoder_for(self, route: object | None) -> Decoder:
        """The decoder of the graph runs take now: the base's (``route`` None: fused adapters)
        or the graph variant's (``route``: the runtime's ``route``, whose optional
        ``decoder()`` opens it). SwitchError where the variant has none."""
        if route is None:
            return self.decoder
        opener = getattr(route, "decoder", None)
        if opener is None:
            raise SwitchError(f"generate: graph variant {route.key!r} has no KV-cache decoder "
                              "on this backend; switch to a fused adapter to generate")
        return opener()


def open_generator(bundle_dir: Path, manifest: Manifest, backend: object, store: object, *,
                   device: str, threads: int | None) -> Generator:
    """The generator of a loaded bundle: BundleError where the bundle cannot generate,
    ConfigError where the backend has no decoder (its optional ``open_decoder``)."""
    spec = GenerationSpec.of(manifest)
    opener = getattr(backend, "open_decoder", None)
    if opener is None:
        raise ConfigError(f"backend {getattr(backend, 'name', backend)!r} cannot generate yet "
                          "(no KV-cache decoder); load the bundle with backend='onnxruntime'")
    tokenizer = None
    if spec.tokenizer is not None:
        tokenizer = Tokenizer(bundle_dir / spec.tokenizer)
    decoder = opener(bundle_dir, manifest, store, device=device, threads=threads)
    return Generator(spec, decoder, tokenizer)


@dataclass(frozen=True)
class Piece:
    """One generated token and the text it completes (may be "": a character still
    incomplete, text held back while it may begin a stop string, or no tokenizer)."""

    token: int
    text: str


@dataclass(frozen=True)
class Generation:
    """A finished reply.

    text: the reply's text (None without a tokenizer), cut before a stop string. ids: its
    tokens (an end-of-turn token included). finish_reason: "stop" (end-of-turn token or stop
    string), "length" (max_new_tokens) or "context" (the conversation filled max_context).
    prompt_tokens: tokens the prompt added. reprefills: times the cache was rebuilt because
    the weights had changed since it was built.
    """

    text: str | None
    ids: list[int]
    finish_reason: str
    prompt_tokens: int
    reprefills: int


class Conversation:
    """Turns that share one KV cache on one runtime (``rt.conversation()``).

    ``tokens`` is the whole context: every prompt and reply so far. The cache holds the keys
    and values of its positions as computed under the weight state (the runtime lock's epoch)
    it was built in; a step under any other state re-prefills first (module docstring).
    """

    def __init__(self, runtime: object, generator: Generator) -> None:
        self._rt = runtime
        self._gen = generator
        self._tokens: list[int] = []
        self._cache: object | None = None
        self._cached = 0  # positions of self._tokens the cache holds
        self._epoch = -1
        self._logits: np.ndarray | None = None  # the last position's, after each step
        self.last: Generation | None = None

    @property
    def tokens(self) -> list[int]:
        """Every token of the conversation so far (a copy)."""
        return list(self._tokens)

    @property
    def max_context(self) -> int:
        return self._gen.spec.max_context

    def reset(self) -> None:
        """Forget every turn (and the cache)."""
        self._tokens, self._cache, self._cached, self._epoch = [], None, 0, -1

    def send(self, prompt: str | Sequence[int] | np.ndarray, **options: object) -> Generation:
        """Add ``prompt`` (text, or token ids) to the conversation and generate the reply
        (options: :class:`Sampling`'s fields); returns it, the reply appended to the
        conversation. Raises ConfigError for a bad prompt or option, with nothing changed."""
        for _ in self.stream(prompt, **options):
            pass
        assert self.last is not None
        return self.last

    def stream(self, prompt: str | Sequence[int] | np.ndarray, **options: object
               ) -> Iterator[Piece]:
        """:meth:`send` as an iterator of :class:`Piece` s, one per token; ``self.last`` holds
        the :class:`Generation` once it is exhausted. The prompt and options are checked here,
        before the first piece is asked for."""
        unknown = sorted(set(options) - set(Sampling.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"generate: unknown options {unknown}; choose from "
                              f"{', '.join(Sampling.__dataclass_fields__)}")
        how = Sampling.checked(**options)
        if how.allowed is not None and how.allowed[-1] >= self._gen.spec.vocab_size:
            raise ConfigError(f"generate: allowed token {how.allowed[-1]} lies outside the "
                              f"model's vocabulary [0, {self._gen.spec.vocab_size})")
        ids = self._prompt_ids(prompt)
        self.last = None
        return self._reply(ids, how)

    def _prompt_ids(self, prompt: object) -> list[int]:
        """The prompt as token ids, checked: ConfigError for an empty prompt, text without a
        tokenizer, ids that are not integers or not below the vocabulary size, or a context
        that would leave no room for a reply."""
        spec = self._gen.spec
        if isinstance(prompt, str):
            if not prompt:
                raise ConfigError("generate: the prompt is empty")
            if self._gen.tokenizer is None:
                raise ConfigError("generate: this bundle has no tokenizer (tokenizer.json); give "
                                  "the prompt as token ids")
            ids = self._gen.tokenizer.encode(prompt, special=not self._tokens)
            if not ids:
                raise ConfigError(f"generate: the prompt {prompt!r} encodes to no tokens")
        else:
            arr = np.asarray(prompt)
            if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
                raise ConfigError(f"generate: token ids must be a 1-D sequence of integers, got "
                                  f"{arr.dtype} of shape {arr.shape}")
            if not arr.size:
                raise ConfigError("generate: the prompt is empty (no token ids)")
            ids = [int(i) for i in arr]
        lo, hi = min(ids), max(ids)
        if lo < 0 or hi >= spec.vocab_size:
            raise ConfigError(f"generate: token ids in [{lo}, {hi}] lie outside the model's "
                              f"vocabulary [0, {spec.vocab_size})")
        total = len(self._tokens) + len(ids)
        if total >= spec.max_context:
            raise ConfigError(
                f"generate: the context would hold {total} tokens ({len(ids)} of this prompt); "
                f"the bundle's decoder takes at most {spec.max_context}, one of them for the "
                "reply (export with a larger --max-context, or start a new conversation)")
        return ids

    def _reply(self, prompt: list[int], how: Sampling) -> Iterator[Piece]:
        spec, tok = self._gen.spec, self._gen.tokenizer
        rng = np.random.default_rng(how.seed)
        reply: list[int] = []
        reprefills = self._advance(prompt)
        self._tokens.extend(prompt)
        text, emitted, finish = "", 0, None
        detok = None if tok is None else Detokenizer(tok)
        while finish is None:
            token = sample(self._logits, how, rng)
            reply.append(token)
            self._tokens.append(token)
            if detok is not None:
                text = detok.add(token)  # whole characters: a stop string may follow
                cut = _first_stop(text, how.stop)
                if cut is not None:
                    text, finish = text[:cut], "stop"
            if token in spec.eos_token_ids:
                finish = "stop"
            elif finish is None and len(reply) >= how.max_new_tokens:
                finish = "length"
            elif finish is None and len(self._tokens) >= spec.max_context:
                finish = "context"
            if finish is not None and tok is not None and cut is None:
                text = tok.decode(reply)  # with a trailing incomplete character, if any
            end = len(text) if finish is not None else _safe_end(text, how.stop)
            piece, emitted = text[emitted:end], max(emitted, end)
            if finish is not None:
                self.last = Generation(None if tok is None else text, reply, finish,
                                       len(prompt), reprefills)
            yield Piece(token, piece)
            if finish is None:
                reprefills += self._advance([])

    def _advance(self, new: list[int]) -> int:
        """Feed the positions the cache lacks (the last token, and ``new``) in chunks of at
        most PREFILL_CHUNK. Each chunk or decode step runs optimistically
        (:meth:`~edgeadapt.runtime.locks.ReadWriteLock.optimistic`: a switch never waits for
        it) where the fused decoder says a switch may write during its runs (``optimistic``)
        and no variant is active, else under the lock held shared (a switch waits for one
        chunk or step). A cache from another epoch (built before a switch) is dropped and
        everything is fed again; a step during which a switch began may have read half-written
        weights, so its logits and the cache it wrote are dropped the same way. After
        :data:`RESTARTS_BEFORE_HOLDING` such restarts within one call, the rest is fed under
        the lock held shared from start to end, so switches faster than a prefill cannot
        starve a conversation (they wait for it instead). Leaves the last position's logits in
        ``self._logits``; returns the number of rebuilds. A failed step drops the cache (the
        next reply re-prefills)."""
        rt = self._rt
        tokens = self._tokens + new if new else self._tokens
        rebuilds, logits = 0, None
        fused_optimistic = getattr(self._gen.decoder, "optimistic", False)
        try:
            while logits is None or self._cached < len(tokens):
                holding = rebuilds >= RESTARTS_BEFORE_HOLDING
                optimistic = fused_optimistic and rt.route is None and not holding
                with (rt.lock.optimistic if optimistic else rt.lock.shared)() as window:
                    if optimistic and rt.route is not None:
                        logits = None  # a variant came in: its decoder runs held shared
                        continue
                    decoder = self._gen.decoder_for(rt.route)  # changes with the epoch only
                    if self._cache is None or window.epoch != self._epoch:
                        rebuilds += self._cache is not None
                        self._cache, self._cached = decoder.empty_cache(1), 0
                        self._epoch = window.epoch
                    while True:  # one chunk, or every chunk left when holding the lock
                        start = self._cached
                        chunk = np.asarray([tokens[start:start + PREFILL_CHUNK]],
                                           dtype=np.int64)
                        try:
                            logits, self._cache = (
                                decoder.step(chunk, self._cache, window, keep=1)
                                if optimistic else decoder.step(chunk, self._cache, keep=1))
                        except Exception:
                            if window.intact():
                                raise
                            logits = None  # terminated by the switch (Window.on_cancel)
                            break
                        self._cached = start + chunk.shape[1]
                        if not holding or self._cached >= len(tokens):
                            break
                    if not window.intact():  # torn: rebuild under the new weights
                        logits, self._epoch = None, -1
        except BaseException:
            self._cache = None  # a step may have updated it in place: rebuild next time
            raise
        self._logits = logits[0, -1]
        return rebuilds


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the first stop string begins in ``text``, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _safe_end(text: str, stops: tuple[str, ...]) -> int:
    """How much of an unfinished reply's ``text`` a stream may hand out: not a trailing
    incomplete character, nor a tail that may still grow into a stop string."""
    end = len(text)
    while end and text[end - 1] == INCOMPLETE:
        end -= 1
    hold = max((k for s in stops for k in range(1, len(s)) if text[:end].endswith(s[:k])),
               default=0)
    return end - hold
