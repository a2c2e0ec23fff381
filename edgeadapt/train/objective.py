"""Losses and metrics: what a batch scores, and how a split is evaluated.

Classification: scores (B, labels) with the labels outside an example's group set to -inf;
loss = cross-entropy over the scores; accuracy = argmax == label.
Language modelling: loss = next-token cross-entropy; perplexity = exp(total NLL / tokens).
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F
from tqdm import tqdm

from edgeadapt.models import LoadedModel, forward
from edgeadapt.train.data import Encoded, Encoding, collate


def class_scores(lm: LoadedModel, batch: dict[str, torch.Tensor],
                 label_tokens: torch.Tensor | None) -> torch.Tensor:
    """(B, labels) scores; entries outside ``batch["allowed"]`` are -inf."""
    if lm.kind == "classifier":
        scores = forward(lm, {"input_ids": batch["input_ids"],
                              "attention_mask": batch["attention_mask"]})
    else:
        logits = forward(lm, {"input_ids": batch["input_ids"]})  # (B, S, V)
        last = logits[torch.arange(len(logits)), batch["lengths"] - 1]  # (B, V)
        scores = last[:, label_tokens]
    return scores.masked_fill(~batch["allowed"][:, : scores.shape[1]], float("-inf"))


def loss_sum(lm: LoadedModel, batch: dict[str, torch.Tensor],
             label_tokens: torch.Tensor | None) -> torch.Tensor:
    """Summed (not averaged) loss of a batch: over examples, or over predicted tokens for LM."""
    if batch["labels"].numel() and int(batch["labels"][0]) < 0:  # language modelling
        logits = forward(lm, {"input_ids": batch["input_ids"]})
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["input_ids"][:, 1:].flatten(),
                               reduction="sum")
    return F.cross_entropy(class_scores(lm, batch, label_tokens), batch["labels"],
                           reduction="sum")


def loss_count(data: Encoded, index: list[int]) -> int:
    """What :func:`loss_sum` sums over for ``index``: examples, or next-token predictions."""
    if len(data) and int(data.labels[0]) < 0:
        return sum(len(data.ids[i]) - 1 for i in index)
    return len(index)


@torch.no_grad()
def evaluate(lm: LoadedModel, enc: Encoding, data: Encoded | None = None, batch_size: int = 64,
             groups: dict[str, tuple[int, ...]] | None = None, progress: bool = True
             ) -> dict[str, float]:
    """Metrics of ``lm`` on ``data`` (default: the test split), in eval mode.

    Classification -> {"accuracy", "loss"} (+ "accuracy/<group>" when there are several groups);
    language modelling -> {"perplexity", "loss"} (loss = mean NLL per token, nats).
    """
    data = enc.test if data is None else data
    was_training = lm.model.training
    lm.model.eval()
    order = sorted(range(len(data)), key=lambda i: len(data.ids[i]))  # less padding
    total, count, right = 0.0, 0, torch.zeros(len(data), dtype=torch.bool)
    lm_task = len(data) and int(data.labels[0]) < 0
    for start in tqdm(range(0, len(order), batch_size), desc="eval", leave=False,
                      disable=not progress):
        index = order[start:start + batch_size]
        batch = collate(lm, data, index, enc.pad_id)
        total += float(loss_sum(lm, batch, enc.label_tokens))
        count += loss_count(data, index)
        if not lm_task:
            pred = class_scores(lm, batch, enc.label_tokens).argmax(-1)
            right[index] = pred == batch["labels"]
    lm.model.train(was_training)
    mean = total / max(count, 1)
    if lm_task:
        return {"perplexity": math.exp(mean), "loss": mean}
    metrics = {"accuracy": float(right.float().mean()) if len(data) else float("nan"),
               "loss": mean}
    if groups and len(groups) > 1:
        for group, ids in groups.items():
            mine = torch.isin(data.labels, torch.tensor(ids))
            metrics[f"accuracy/{group}"] = float(right[mine].float().mean())
    return metrics
