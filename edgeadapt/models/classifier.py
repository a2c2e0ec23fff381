"""Sentence classifier over a pretrained encoder: mean pooling + a linear head.

    logits = W_c · ( sum_t m_t h_t / max(sum_t m_t, 1) ) + b_c

h_t: the encoder's last hidden states (batch, seq, hidden); m_t: the attention mask. all-MiniLM-
L6-v2 was trained for mean pooling; its BERT pooler ([CLS] -> dense -> tanh, what
``BertForSequenceClassification`` classifies) is an untrained leftover whose frozen probe sits
near the majority class (docs/results.md), so the pooler is dropped.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput


class MeanPoolClassifier(nn.Module):
    """An encoder (kept under its own ``base_model_prefix``, e.g. ``bert``, so weight names are
    the checkpoint's) plus ``classifier``: nn.Linear(hidden, num_labels), bias zero-init."""

    def __init__(self, encoder: nn.Module, num_labels: int):
        super().__init__()
        self.base_model_prefix = getattr(encoder, "base_model_prefix", "encoder") or "encoder"
        setattr(self, self.base_model_prefix, encoder)
        self.config = encoder.config
        self.config.num_labels = num_labels
        self.classifier = nn.Linear(self.config.hidden_size, num_labels)
        std = getattr(self.config, "initializer_range", 0.02)
        nn.init.normal_(self.classifier.weight, std=std)
        nn.init.zeros_(self.classifier.bias)

    @property
    def encoder_module(self) -> nn.Module:
        return getattr(self, self.base_model_prefix)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> SequenceClassifierOutput:
        h = self.encoder_module(input_ids=input_ids, attention_mask=attention_mask
                                ).last_hidden_state
        if attention_mask is None:
            pooled = h.mean(dim=1)
        else:
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
        return SequenceClassifierOutput(logits=self.classifier(pooled))
