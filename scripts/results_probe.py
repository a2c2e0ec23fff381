"""Reference linear probes on the frozen MiniLM encoder (scikit-learn logistic regression, fitted
to convergence) for docs/results.md: which pooled feature the ~0.74 of ASSETS.md refers to.

    PYTHONPATH=. .venv/bin/python scripts/results_probe.py

Features of the 2,000 / 1,000 Rotten Tomatoes split (max_len 64): the BERT pooler output (what
BertForSequenceClassification's head sees; edgeadapt classified it before MeanPoolClassifier),
the mean of the last hidden states (sentence-transformers' pooling, what `--method none` now
trains on), and the raw [CLS] state. The encoder is loaded here with its pooler, which
``edgeadapt.models`` drops.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from transformers import AutoTokenizer, BertModel

from edgeadapt.models.registry import minilm_path
from edgeadapt.tasks import load_task


def features(bert, tokenizer, examples) -> dict[str, np.ndarray]:
    out: dict[str, list[torch.Tensor]] = {"pooler": [], "mean": [], "cls": []}
    for i in range(0, len(examples), 64):
        batch = tokenizer([e.text for e in examples[i:i + 64]], truncation=True,
                             max_length=64, padding=True, return_tensors="pt")
        with torch.no_grad():
            o = bert(**batch)
        mask = batch["attention_mask"][..., None].float()
        out["pooler"].append(o.pooler_output)
        out["mean"].append((o.last_hidden_state * mask).sum(1) / mask.sum(1))
        out["cls"].append(o.last_hidden_state[:, 0])
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def main() -> None:
    torch.set_num_threads(1)
    path = minilm_path()
    bert, tokenizer = BertModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    task = load_task("rt-sentiment", max_train=2000, max_test=1000)
    train = features(bert, tokenizer, task.train)
    test = features(bert, tokenizer, task.test)
    y_train = np.array([e.label for e in task.train])
    y_test = np.array([e.label for e in task.test])
    for name in train:
        for c in (0.1, 1.0, 10.0):
            clf = LogisticRegression(C=c, max_iter=2000).fit(train[name], y_train)
            print(f"{name:<7} C={c:<5} test accuracy {clf.score(test[name], y_test):.3f}")


if __name__ == "__main__":
    main()
