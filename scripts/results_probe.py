"""Reference linear probes on the frozen MiniLM encoder (scikit-learn logistic regression, fitted
to convergence) for docs/results.md: which pooled feature the ~0.74 of ASSETS.md refers to.

    PYTHONPATH=. .venv/bin/python scripts/results_probe.py

Features of the 2,000 / 1,000 Rotten Tomatoes split (max_len 64): the BERT pooler output (what
BertForSequenceClassification's head sees, so what `--method none` trains on), the mean of the
last hidden states (sentence-transformers' pooling), and the raw [CLS] state.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from edgeadapt.models import load_model
from edgeadapt.tasks import load_task


def features(lm, examples) -> dict[str, np.ndarray]:
    out: dict[str, list[torch.Tensor]] = {"pooler": [], "mean": [], "cls": []}
    for i in range(0, len(examples), 64):
        batch = lm.tokenizer([e.text for e in examples[i:i + 64]], truncation=True,
                             max_length=64, padding=True, return_tensors="pt")
        with torch.no_grad():
            o = lm.model.bert(**batch)
        mask = batch["attention_mask"][..., None].float()
        out["pooler"].append(o.pooler_output)
        out["mean"].append((o.last_hidden_state * mask).sum(1) / mask.sum(1))
        out["cls"].append(o.last_hidden_state[:, 0])
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def main() -> None:
    torch.set_num_threads(1)
    lm = load_model("minilm")
    task = load_task("rt-sentiment", max_train=2000, max_test=1000)
    train, test = features(lm, task.train), features(lm, task.test)
    y_train = np.array([e.label for e in task.train])
    y_test = np.array([e.label for e in task.test])
    for name in train:
        for c in (0.1, 1.0, 10.0):
            clf = LogisticRegression(C=c, max_iter=2000).fit(train[name], y_train)
            print(f"{name:<7} C={c:<5} test accuracy {clf.score(test[name], y_test):.3f}")


if __name__ == "__main__":
    main()
