"""The tiny generate bundle the generation tests share: tiny SmolLM2 (q/v live) with its
KV-cache decoder and a byte-level tokenizer (:func:`byte_tokenizer`), and two SHiRA adapters
that change the greedy tokens: s1 at 5% of every live weight, s2 at 20% of two of them
(:func:`export_generate`); transformers' greedy replies under them (:func:`hf_greedy`), and two
threads generating while a third switches between them (:func:`generate_while_switching`,
:func:`assert_argmax_under_s1_or_s2`); a switch between turns
(:func:`assert_switch_between_turns_reprefills`), the context limit
(:func:`assert_context_limit`), a real model's text reply
(:func:`assert_text_greedy_equals_transformers`). :func:`export_tiny_generate` saves the model as a
Hugging Face directory first and exports from it (the bundle records it, so the bench's PyTorch
reference and onnxruntime-genai's builder start from it)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch
from runtime_reference import random_adapters, register_adapters

from edgeadapt.adapters.reference import reference_greedy, reference_model
from edgeadapt.export.bundle import export_base
from edgeadapt.format import read_adapter, read_manifest
from edgeadapt.format.types import Adapter
from edgeadapt.models import LoadedModel, forward, load_model


def byte_tokenizer(size: int = 512):
    """A byte-level BPE tokenizer of ``size`` tokens (3 special, 256 bytes, merges of two
    lowercase letters), as a transformers fast tokenizer, so that the exporter copies it like a
    real model's and every id of tiny SmolLM2's vocabulary has a text."""
    from string import ascii_lowercase

    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    merges = [(a, b) for a in ascii_lowercase for b in ascii_lowercase][: size - len(vocab)]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    raw = RawTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def export_generate(lm: LoadedModel, out: Path, max_context: int,
                    backends: str = "onnxruntime", **options: object) -> Path:
    """Export ``lm`` (its tokenizer included) to ``out`` for ``backends`` with ``--generate``
    (``options``: more of ``export_base``'s) and register the SHiRA adapters s1 and s2 (module
    docstring); returns ``out``."""
    export_base(lm, out, backends=backends, targets="qv", generate=True,
                max_context=max_context, **options)
    manifest = read_manifest(out)
    names = sorted(manifest.weights)
    s1, s2, _ = random_adapters(lm, names, names[:2], seed=1)
    register_adapters(out, manifest, {"s1": s1, "s2": s2})
    return out


def export_tiny_generate(root: Path, max_context: int = 96) -> tuple[LoadedModel, Path]:
    """``root/hf`` (tiny SmolLM2 and the byte tokenizer as a Hugging Face directory) and
    ``root/bundle`` exported from it by :func:`export_generate`; returns the model as loaded
    from the directory and the bundle."""
    torch.set_num_threads(1)
    hf = root / "hf"
    load_model("tiny-smollm2", seed=0).model.save_pretrained(hf)
    byte_tokenizer().save_pretrained(hf)
    lm = load_model(str(hf))
    return lm, export_generate(lm, root / "bundle", max_context)


def bundle_adapter(bundle: Path, name: str) -> Adapter:
    """Adapter ``name`` of the bundle, read from its file."""
    return read_adapter(bundle / read_manifest(bundle).adapters[name].file)


def hf_greedy(lm: LoadedModel, bundle: Path, name: str | None, ids: list[int], n: int
              ) -> list[int]:
    """transformers' greedy ``generate`` (:func:`edgeadapt.adapters.reference.reference_greedy`)
    on ``lm`` carrying the bundle's adapter ``name`` (None: the base), stopping on the bundle's
    end-of-turn tokens: the ``n`` new tokens (fewer where it ends on one)."""
    return reference_greedy(lm, [] if name is None else [bundle_adapter(bundle, name)], ids, n,
                            read_manifest(bundle).extra["generate"]["eos_token_ids"])


def generate_while_switching(rt, vocab_size: int, replies: int, new_tokens: int,
                             min_flips: int = 4
                             ) -> tuple[list[tuple[list[int], object]], int]:
    """Two threads each generate at least ``replies`` greedy replies of ``new_tokens`` to random
    6-token prompts on ``rt`` while this thread switches s1 <-> s2 every millisecond; a thread
    goes on past ``replies`` until ``min_flips`` switches are done (at most 20x ``replies``), so
    a slow first switch cannot leave the replies unswitched. Returns the (prompt, Generation)
    pairs and the number of switches. Raises the first error a thread met."""
    out, failures, flips = [], [], [0]

    def talk(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for k in range(20 * replies):
                if k >= replies and flips[0] >= min_flips:
                    break
                prompt = [int(i) for i in rng.integers(5, vocab_size, 6)]
                out.append((prompt, rt.generate(prompt, max_new_tokens=new_tokens)))
        except Exception as exc:  # raised below, in the test's thread
            failures.append(exc)

    threads = [threading.Thread(target=talk, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        rt.switch("s2" if flips[0] % 2 == 0 else "s1")
        flips[0] += 1
        threading.Event().wait(0.001)
    for t in threads:
        t.join()
    if failures:
        raise failures[0]
    return out, flips[0]


def assert_argmax_under_s1_or_s2(lm: LoadedModel, bundle: Path, replies) -> None:
    """Each token of each (prompt, Generation) reply is the argmax of its whole context under
    the PyTorch model carrying s1 or carrying s2: no step mixed two weight states or read a
    stale cache."""
    refs = [reference_model(lm, [bundle_adapter(bundle, n)]) for n in ("s1", "s2")]
    for prompt, gen in replies:
        with torch.no_grad():
            logits = [forward(ref, {"input_ids": torch.tensor([prompt + gen.ids])})[0]
                      for ref in refs]
        for k, token in enumerate(gen.ids):
            at = len(prompt) + k - 1
            assert token in {int(x[at].argmax()) for x in logits}, (prompt, gen.ids)


def assert_switch_between_turns_reprefills(rt, lm: LoadedModel, bundle: Path,
                                           prompt: list[int]) -> None:
    """A turn under s1, a switch to s2, a second turn: the second reply re-prefills and equals
    a fresh conversation's under s2 and transformers' on the whole context, not s1's; a
    negative control that fools the epoch check continues the stale cache and gets another
    reply (so the check can fail)."""
    rt.switch("s1")
    chat = rt.conversation()
    first = chat.send(prompt, max_new_tokens=6)
    rt.switch("s2")
    second = chat.send([40, 41, 42], max_new_tokens=10)
    history = prompt + first.ids + [40, 41, 42]
    assert chat.tokens == history + second.ids and second.reprefills == 1
    fresh = rt.generate(history, max_new_tokens=10)  # a new conversation under s2
    assert second.ids == fresh.ids == hf_greedy(lm, bundle, "s2", history, 10)
    assert second.ids != hf_greedy(lm, bundle, "s1", history, 10)  # the switch matters
    rt.switch("s1")
    stale = rt.conversation()
    stale.send(prompt, max_new_tokens=6)
    rt.switch("s2")
    stale._epoch = rt.lock.epoch
    assert stale.send([40, 41, 42], max_new_tokens=10).ids != second.ids


def assert_interleaved_conversations(rt, lm: LoadedModel, bundle: Path, prompt: list[int],
                                     turns: list[tuple[int, list[int]]], new_tokens: int
                                     ) -> None:
    """Under s1 (switched in here), conversations 0 (``prompt``) and 1 stream 12 tokens each in
    turn from this thread, then take ``turns`` (conversation index, ids; ``new_tokens`` each):
    every reply equals transformers' greedy reply on that conversation's own context, and no
    turn re-prefills."""
    rt.switch("s1")
    convs = [rt.conversation(), rt.conversation()]
    prompts = [prompt, [300, 12, 99, 7]]
    streams = [c.stream(p, max_new_tokens=12) for c, p in zip(convs, prompts, strict=True)]
    got: list[list[int]] = [[], []]
    for _ in range(12):
        for i, pieces in enumerate(streams):
            got[i].append(next(pieces).token)
    for i in range(2):
        assert got[i] == hf_greedy(lm, bundle, "s1", prompts[i], 12)
    for i, turn in turns:
        context = convs[i].tokens + turn
        assert convs[i].send(turn, max_new_tokens=new_tokens).ids == hf_greedy(
            lm, bundle, "s1", context, new_tokens)
        assert convs[i].last.reprefills == 0  # kept (ExecuTorch: moved back in), not rebuilt


def assert_context_limit(rt, context: int) -> None:
    """A prompt of ``context - 1`` tokens gets one token (``"context"``); one more token is
    refused, the error naming the limit."""
    import pytest

    from edgeadapt.errors import ConfigError

    ids = [int(i) for i in np.arange(context - 1) % 400 + 5]
    out = rt.generate(ids, max_new_tokens=5)  # one position left: one token
    assert out.finish_reason == "context" and len(out.ids) == 1
    with pytest.raises(ConfigError, match=f"at most {context}"):
        rt.generate(ids + [5], max_new_tokens=5)


def assert_text_greedy_equals_transformers(rt, lm: LoadedModel, bundle: Path, text: str, n: int,
                                           adapters: tuple[str | None, ...]) -> None:
    """Under each of ``adapters`` (None: the base), ``rt``'s greedy reply of ``n`` tokens to
    ``text`` (the bundle's tokenizer) equals transformers' on ``lm``'s own tokenization."""
    prompt = lm.tokenizer(text)["input_ids"]
    for adapter in adapters:
        rt.switch(adapter)
        out = rt.generate(text, max_new_tokens=n)
        assert out.prompt_tokens == len(prompt)
        assert out.ids == hf_greedy(lm, bundle, adapter, prompt, n), adapter
