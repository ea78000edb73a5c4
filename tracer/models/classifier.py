"""*ForSequenceClassification: the encoder, then the family's head (models/family.py Head) on each text
(or query-document pair): pool (first token or mean), dense + activation, norm, output projection ->
logits per label. Cross-encoders (rerankers) are these with one label. The head is small and runs whole
on every rank, on the all-reduced hidden states."""

from __future__ import annotations

import torch
from torch import nn

from .encoder import ACTIVATIONS
from .family import Head

HEAD_ACTIVATIONS = {**ACTIVATIONS, "tanh": torch.tanh}


class ClassifierHead(nn.Module):
    """Its parameters are named as the checkpoint names them (load maps `dense.weight` to Head.dense)."""

    def __init__(self, spec: Head, hidden: int, labels: int, has_bias, norm_eps: float) -> None:
        super().__init__()
        self.pooling = spec.pooling
        if spec.pooling not in ("cls", "mean"):
            raise ValueError(f"classifier pooling {spec.pooling!r} is not supported (cls or mean)")
        if spec.dense is not None:
            self.dense = nn.Linear(hidden, hidden, bias=has_bias(spec.dense))
            self.act = HEAD_ACTIVATIONS[spec.activation]
        if spec.norm is not None:
            self.norm = nn.LayerNorm(hidden, eps=norm_eps, bias=has_bias(spec.norm))
        self.out = nn.Linear(hidden, labels, bias=has_bias(spec.out))
        self.spec = spec

    def names(self) -> dict:
        """{our key: the checkpoint's} for load."""
        parts = {"dense": self.spec.dense, "norm": self.spec.norm, "out": self.spec.out}
        return {key: f"{parts[key.split('.')[0]]}.{key.split('.')[1]}" for key in self.state_dict()}

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "dense"):
            pooled = self.act(self.dense(pooled))
        if hasattr(self, "norm"):
            pooled = self.norm(pooled)
        return self.out(pooled)


class SequenceClassifier(nn.Module):
    """forward(input_ids, attention_mask, token_type_ids, pool) -> logits [B, labels] (padded rows; `pool`
    is taken for the same signature as the sentence embedders and not used)."""

    def __init__(self, encoder: nn.Module, head: ClassifierHead) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, input_ids, attention_mask, token_type_ids, pool):
        tokens = self.encoder(input_ids, attention_mask, token_type_ids)
        if self.head.pooling == "cls":
            return self.head(tokens[:, 0])
        weights = attention_mask.to(tokens.dtype).unsqueeze(-1)
        return self.head((tokens * weights).sum(dim=1) / weights.sum(dim=1))


class PackedSequenceClassifier(SequenceClassifier):
    """forward(input_ids, positions, token_types, pool [T], lengths [R]) -> logits [R, labels] for up to R
    texts packed end to end (Encoder.packed); an absent text (length 0) gives a row not used."""

    def forward(self, input_ids, positions, token_types, pool, lengths):
        ends = lengths.cumsum(0)
        starts = ends - lengths
        tokens = self.encoder.packed(input_ids, positions, token_types, torch.cat([torch.zeros_like(ends[:1]), ends]))
        if self.head.pooling == "cls":
            return self.head(tokens.index_select(0, starts.clamp(max=tokens.size(0) - 1)))
        index = torch.ones_like(positions).cumsum(0) - 1
        member = (index.unsqueeze(0) >= starts.unsqueeze(1)) & (index.unsqueeze(0) < ends.unsqueeze(1))
        weights = member.to(tokens.dtype)
        return self.head((weights @ tokens) / weights.sum(dim=1, keepdim=True).clamp(min=1))
