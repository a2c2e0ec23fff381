"""Driving a loaded model: example inputs and a plain-logits forward (the one place that unwraps
Hugging Face output objects; exporters trace :class:`LogitsModule`)."""

from __future__ import annotations

import torch
from torch import nn

from edgeadapt.models.registry import LoadedModel


def example_inputs(lm: LoadedModel, batch: int = 2, seq: int = 16, seed: int = 0
                   ) -> dict[str, torch.Tensor]:
    """Random token ids (int64, (batch, seq)); classifiers also get an all-ones attention mask.

    Ids avoid the first 5 ids of the vocabulary (special tokens in both tokenizers).
    """
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, lm.vocab_size, (batch, seq), generator=gen, dtype=torch.int64)
    if lm.kind == "classifier":
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return {"input_ids": ids}


class LogitsModule(nn.Module):
    """``forward(input_ids[, attention_mask]) -> logits`` over a Hugging Face model.

    Classifier: logits (batch, labels). Causal LM: logits (batch, seq, vocab), full sequence,
    no KV cache.
    """

    def __init__(self, lm: LoadedModel):
        super().__init__()
        self.model = lm.model
        self.kind = lm.kind

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        if self.kind == "classifier":
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return self.model(input_ids=input_ids, use_cache=False).logits


def forward(lm: LoadedModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of ``lm`` on ``inputs`` (see :class:`LogitsModule`)."""
    return LogitsModule(lm)(**inputs)
