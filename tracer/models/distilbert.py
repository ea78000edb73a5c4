"""DistilBERT (DistilBertModel, DistilBertForSequenceClassification): BERT's layers without token
types, under other names."""

from __future__ import annotations

from .encoder import EncoderConfig
from .family import EncoderFamily, Head


def config(hf) -> EncoderConfig:
    return EncoderConfig(
        vocab_size=hf.vocab_size, hidden_size=hf.dim, intermediate_size=hf.hidden_dim, num_layers=hf.n_layers,
        num_heads=hf.n_heads, activation=hf.activation, max_positions=hf.max_position_embeddings)


def names(c: EncoderConfig) -> dict:
    layer = "transformer.layer.{i}"
    return {
        "embeddings.word": "embeddings.word_embeddings",
        "embeddings.position": "embeddings.position_embeddings",
        "embeddings.norm": "embeddings.LayerNorm",
        "layers.{i}.attn.q": f"{layer}.attention.q_lin",
        "layers.{i}.attn.k": f"{layer}.attention.k_lin",
        "layers.{i}.attn.v": f"{layer}.attention.v_lin",
        "layers.{i}.attn.o": f"{layer}.attention.out_lin",
        "layers.{i}.attn_norm": f"{layer}.sa_layer_norm",
        "layers.{i}.mlp.up": f"{layer}.ffn.lin1",
        "layers.{i}.mlp.down": f"{layer}.ffn.lin2",
        "layers.{i}.mlp_norm": f"{layer}.output_layer_norm",
    }


FAMILY = EncoderFamily(
    name="distilbert", config=config, names=names, base_prefix="distilbert.",
    head=lambda hf: Head(dense="pre_classifier", activation="relu", out="classifier"),
    unused=("vocab_", "embeddings.position_ids", "distilbert.embeddings.position_ids"))
