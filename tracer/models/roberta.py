"""RoBERTa, XLM-RoBERTa, CamemBERT (*Model, *ForSequenceClassification): BERT's layers, positions
numbered from padding_idx + 1. multilingual-e5, bge-m3, bge-reranker-v2-m3."""

from __future__ import annotations

from dataclasses import replace

from . import bert
from .encoder import EncoderConfig
from .family import EncoderFamily, Head


def config(hf) -> EncoderConfig:
    return replace(bert.config(hf), position_offset=hf.pad_token_id + 1)


FAMILY = EncoderFamily(
    name="roberta", config=config, names=bert.names, base_prefix="roberta.",
    head=lambda hf: Head(dense="classifier.dense", activation="tanh", out="classifier.out_proj"),
    unused=("pooler.", "roberta.pooler.", "embeddings.position_ids", "roberta.embeddings.position_ids", "lm_head."))
