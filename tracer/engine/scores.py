"""A classifier's logits as the scores users read: a reranker's relevance (what CrossEncoder.predict
gives: sigmoid of a one-label model's logit), a classifier's label probabilities (softmax, or
sigmoid per label for a multi-label model), and documents ranked by relevance."""

from __future__ import annotations

import math


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _softmax(logits: list[float]) -> list[float]:
    top = max(logits)
    exps = [math.exp(x - top) for x in logits]
    total = sum(exps)
    return [e / total for e in exps]


def relevance(logits: list[float], raw: bool = False) -> float:
    """A query-document pair's score: one label, its sigmoid (raw: the logit); several labels (a
    reranker trained as a two-class classifier), the last label's softmax probability (raw: its logit)."""
    if len(logits) == 1:
        return logits[0] if raw else _sigmoid(logits[0])
    return logits[-1] if raw else _softmax(logits)[-1]


def probabilities(logits: list[float], labels: dict, raw: bool = False) -> list[float]:
    """A classifier's score per label, in label order: softmax over the labels, or a sigmoid each where
    the model is multi-label or has one label (raw: the logits)."""
    if raw:
        return list(logits)
    if labels.get("multi_label") or len(logits) == 1:
        return [_sigmoid(x) for x in logits]
    return _softmax(logits)


def label_scores(logits: list[float], labels: dict, raw: bool = False) -> list[dict]:
    """[{"label", "score"}] for every label, highest first (probabilities)."""
    names = labels.get("id2label") or [f"LABEL_{i}" for i in range(len(logits))]
    scores = probabilities(logits, labels, raw)
    return sorted(({"label": names[i], "score": s} for i, s in enumerate(scores)), key=lambda d: -d["score"])


def ranked(scores: list[float], top_n: int | None = None) -> list[int]:
    """Indices of `scores`, highest first (ties in input order), the first top_n."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    return order if top_n is None else order[:top_n]
