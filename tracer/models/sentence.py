"""Sentence embeddings as sentence-transformers computes them: BERT, masked pooling, normalisation.

Reads the checkpoint dir's modules.json / 1_Pooling/config.json, so the traced model returns
exactly what SentenceTransformer(dir).encode() returns. Padding never changes a result: padded
positions have attention mask 0 and are excluded from attention and from the pooling.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .bert import ParallelBertModel, load_bert

POOLING_KEYS = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens"}
POOLING_MODES = tuple(POOLING_KEYS)


def sentence_transformers_settings(model_dir: Path) -> dict | None:
    """{"pooling": mode, "normalize": bool} for a sentence-transformers dir, else None."""
    modules_file = model_dir / "modules.json"
    if not modules_file.is_file():
        return None
    modules = json.loads(modules_file.read_text())
    types = [m["type"].rsplit(".", 1)[-1] for m in modules]
    pooling = "mean"
    for m in modules:
        if m["type"].endswith("Pooling"):
            config = json.loads((model_dir / m["path"] / "config.json").read_text())
            enabled = [key for key, value in config.items() if key.startswith("pooling_mode_") and value]
            if len(enabled) != 1 or enabled[0] not in POOLING_KEYS.values():
                raise ValueError(f"{m['path']}/config.json: only one of mean/cls/max pooling is supported")
            pooling = next(mode for mode, key in POOLING_KEYS.items() if key == enabled[0])
    unsupported = [t for t in types if t not in ("Transformer", "Pooling", "Normalize")]
    if unsupported:
        raise ValueError(f"sentence-transformers modules {unsupported} are not supported "
                         "(supported: Transformer, Pooling, Normalize)")
    return {"pooling": pooling, "normalize": "Normalize" in types}


class SentenceEmbedding(nn.Module):
    """forward(input_ids, attention_mask) -> [B, hidden] sentence embedding."""

    def __init__(self, encoder: ParallelBertModel, pooling: str = "mean", normalize: bool = True) -> None:
        super().__init__()
        if pooling not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {POOLING_MODES}, got {pooling!r}")
        self.encoder, self.pooling, self.normalize = encoder, pooling, normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder(input_ids, attention_mask)
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        if self.pooling == "cls":
            pooled = tokens[:, 0]
        elif self.pooling == "max":
            pooled = tokens.masked_fill(mask == 0, torch.finfo(tokens.dtype).min).amax(dim=1)
        else:
            pooled = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, p=2.0, dim=1) if self.normalize else pooled


class PackedSentenceEmbedding(SentenceEmbedding):
    """forward(input_ids [T], positions [T], lengths [R]) -> [R, hidden]: up to R texts packed end to
    end (text r: the next lengths[r] tokens; an absent text has length 0, tokens after the last text
    are padding), each pooled over its own tokens. The same results as SentenceEmbedding, without
    computing a padded token (ParallelBertModel.packed)."""

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        ends = lengths.cumsum(0)
        offsets = torch.cat([torch.zeros_like(ends[:1]), ends])
        tokens = self.encoder.packed(input_ids, positions, offsets)
        # member[r, t]: token t belongs to text r (arange without a device baked into the graph)
        index = torch.ones_like(input_ids).cumsum(0) - 1
        member = (index.unsqueeze(0) >= offsets[:-1].unsqueeze(1)) & (index.unsqueeze(0) < ends.unsqueeze(1))
        if self.pooling == "cls":
            pooled = tokens.index_select(0, offsets[:-1].clamp(max=input_ids.size(0) - 1))
        elif self.pooling == "max":
            pooled = tokens.unsqueeze(0).masked_fill(~member.unsqueeze(-1), torch.finfo(tokens.dtype).min).amax(dim=1)
        else:
            pooled = (member.to(tokens.dtype) @ tokens) / lengths.unsqueeze(1).to(tokens.dtype).clamp(min=1e-9)
        return F.normalize(pooled, p=2.0, dim=1) if self.normalize else pooled


def load_sentence_model(model_dir, pooling: str = "mean", normalize: bool = True,
                        packed: bool = False, weights: str = "fp32") -> tuple[nn.Module, dict]:
    """A `func` for parallel_model_trace: this rank's shard of a BERT sentence embedder, taking padded
    rows (input_ids, attention_mask) or, packed=True, texts packed end to end (PackedSentenceEmbedding);
    weights: fp32, bf16 or int8 (load_bert)."""
    encoder, _ = load_bert(model_dir, weights=weights)
    return (PackedSentenceEmbedding if packed else SentenceEmbedding)(encoder, pooling, normalize).eval(), {}
