"""MPNet (MPNetModel, MPNetForSequenceClassification): BERT-like post-norm layers without token types,
positions numbered from padding_idx + 1, and a bias per relative position added to every layer's
attention scores (32 buckets, log-spaced beyond 8). all-mpnet-base-v2."""

from __future__ import annotations

from .encoder import EncoderConfig
from .family import EncoderFamily, Head


def config(hf) -> EncoderConfig:
    return EncoderConfig(
        vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads, norm_eps=hf.layer_norm_eps,
        activation=hf.hidden_act, max_positions=hf.max_position_embeddings, position_offset=hf.pad_token_id + 1,
        relative_buckets=hf.relative_attention_num_buckets)


def names(c: EncoderConfig) -> dict:
    layer = "encoder.layer.{i}"
    return {
        "embeddings.word": "embeddings.word_embeddings",
        "embeddings.position": "embeddings.position_embeddings",
        "embeddings.norm": "embeddings.LayerNorm",
        "relative_bias": "encoder.relative_attention_bias",
        "layers.{i}.attn.q": f"{layer}.attention.attn.q",
        "layers.{i}.attn.k": f"{layer}.attention.attn.k",
        "layers.{i}.attn.v": f"{layer}.attention.attn.v",
        "layers.{i}.attn.o": f"{layer}.attention.attn.o",
        "layers.{i}.attn_norm": f"{layer}.attention.LayerNorm",
        "layers.{i}.mlp.up": f"{layer}.intermediate.dense",
        "layers.{i}.mlp.down": f"{layer}.output.dense",
        "layers.{i}.mlp_norm": f"{layer}.output.LayerNorm",
    }


FAMILY = EncoderFamily(
    name="mpnet", config=config, names=names, base_prefix="mpnet.",
    head=lambda hf: Head(dense="classifier.dense", activation="tanh", out="classifier.out_proj"),
    unused=("pooler.", "mpnet.pooler.", "embeddings.position_ids", "mpnet.embeddings.position_ids", "lm_head."))
