"""Tokenise a task for a model and cut it into batches.

Three ways a model meets a task:

- classifier (MiniLM) + classification: ``[CLS] text [SEP]``, right-padded, attention mask;
  scores = the head's logits (B, labels).
- causal LM (SmolLM2) + classification, the *generative classifier*: ``prompt(text)`` followed by
  the tokens the label words share (usually none); scores = the next-token logits of each label
  word's first distinguishing token at the last real position (B, labels). Right padding needs
  no mask: a causal model never looks ahead.
- causal LM + language modelling: the text cut into non-overlapping blocks of ``max_len`` tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from edgeadapt.errors import ConfigError
from edgeadapt.models import LoadedModel
from edgeadapt.tasks import Task


@dataclass
class Encoded:
    """A tokenised split. ids: token lists; labels (N,) int64 (-1 for LM); allowed (N, labels)
    bool: the labels each example chooses among (its group's)."""

    ids: list[list[int]]
    labels: torch.Tensor
    allowed: torch.Tensor

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Encoding:
    """Both splits plus what scoring needs: label_tokens (labels,) for the generative
    classifier, pad id."""

    train: Encoded
    test: Encoded
    label_tokens: torch.Tensor | None
    pad_id: int


def byte_encoder(text: str) -> list[int]:
    """Fallback for tiny models without a tokenizer: UTF-8 bytes as ids (vocab >= 256)."""
    return list(text.encode("utf-8"))


def text_encoder(lm: LoadedModel) -> Callable[[str], list[int]]:
    """text -> ids without special tokens."""
    if lm.tokenizer is None:
        return byte_encoder
    return lambda text: lm.tokenizer.encode(text, add_special_tokens=False)


def label_tokens(encode: Callable[[str], list[int]], words: tuple[str, ...]
                 ) -> tuple[list[int], list[int]]:
    """(shared prefix, one distinguishing token per word): the first position where the words'
    encodings differ. Raises ConfigError if two words cannot be told apart there."""
    encoded = [encode(w) for w in words]
    depth = 0
    while all(len(e) > depth for e in encoded) and len({e[depth] for e in encoded}) == 1:
        depth += 1
    if any(len(e) <= depth for e in encoded) or len({e[depth] for e in encoded}) < len(words):
        raise ConfigError(f"label words {words} do not start with distinct tokens")
    return encoded[0][:depth], [e[depth] for e in encoded]


def _allowed(task: Task, groups: list[str]) -> torch.Tensor:
    allowed = torch.zeros(len(groups), max(task.num_labels, 1), dtype=torch.bool)
    for i, group in enumerate(groups):
        allowed[i, list(task.groups[group])] = True
    return allowed


def _classifier_ids(lm: LoadedModel, text: str, max_len: int) -> list[int]:
    if lm.tokenizer is None:
        return byte_encoder(text)[:max_len]
    return lm.tokenizer(text, truncation=True, max_length=max_len)["input_ids"]


def _lm_blocks(ids: list[int], max_len: int, limit: int | None) -> list[list[int]]:
    blocks = [ids[i:i + max_len] for i in range(0, len(ids) - max_len + 1, max_len)]
    return blocks[:limit] if limit is not None else blocks


def encode_task(lm: LoadedModel, task: Task, max_len: int) -> Encoding:
    """Tokenise ``task`` for ``lm`` (sequences at most ``max_len`` tokens)."""
    encode = text_encoder(lm)
    pad_id = getattr(lm.tokenizer, "pad_token_id", None) or 0
    if task.kind == "language-modeling":
        if lm.kind != "causal-lm":
            raise ConfigError(f"task {task.name!r} is language modelling: it needs a causal LM "
                              "(--model smollm2), not a classifier")
        splits = []
        for examples, limit in ((task.train, task.max_train), (task.test, task.max_test)):
            blocks = _lm_blocks(encode(examples[0].text), max_len, limit)
            n = len(blocks)
            splits.append(Encoded(blocks, torch.full((n,), -1), torch.zeros(n, 1, dtype=bool)))
        return Encoding(splits[0], splits[1], None, pad_id)

    prefix, tokens = [], None
    if lm.kind == "causal-lm":
        prefix, tokens = label_tokens(encode, task.label_words)
        tokens = torch.tensor(tokens)

    def one(text: str, group: str) -> list[int]:
        if lm.kind == "classifier":
            return _classifier_ids(lm, text, max_len)
        head, tail = task.prompts[group].split("{text}")
        head_ids, tail_ids = encode(head), encode(tail) + prefix
        room = max(max_len - len(head_ids) - len(tail_ids), 1)
        return head_ids + encode(text)[:room] + tail_ids

    splits = []
    for examples in (task.train, task.test):
        splits.append(Encoded(
            [one(e.text, e.group) for e in examples],
            torch.tensor([e.label for e in examples], dtype=torch.int64),
            _allowed(task, [e.group for e in examples]),
        ))
    return Encoding(splits[0], splits[1], tokens, pad_id)


def collate(lm: LoadedModel, data: Encoded, index: list[int], pad_id: int
            ) -> dict[str, torch.Tensor]:
    """Batch ``index`` of ``data``: input_ids (B, S) right-padded to the longest, lengths (B,),
    labels (B,), allowed (B, labels); classifiers also get attention_mask (B, S)."""
    seqs = [data.ids[i] for i in index]
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    width = int(lengths.max()) if seqs else 1
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.int64)
    for row, seq in enumerate(seqs):
        ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.int64)
    batch = {"input_ids": ids, "lengths": lengths, "labels": data.labels[index],
             "allowed": data.allowed[index]}
    if lm.kind == "classifier":
        batch["attention_mask"] = (torch.arange(width)[None, :] < lengths[:, None]).long()
    return batch
