"""BERT (BertModel, BertForSequenceClassification): post-norm layers, learned absolute positions and
token types. all-MiniLM-L6-v2, bge-small/base/large-en-v1.5, the ms-marco MiniLM cross-encoders."""

from __future__ import annotations

from .encoder import EncoderConfig
from .family import EncoderFamily, Head


def config(hf) -> EncoderConfig:
    return EncoderConfig(
        vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads, norm_eps=hf.layer_norm_eps,
        activation=hf.hidden_act, max_positions=hf.max_position_embeddings, type_vocab_size=hf.type_vocab_size)


def names(c: EncoderConfig) -> dict:
    layer = "encoder.layer.{i}"
    return {
        "embeddings.word": "embeddings.word_embeddings",
        "embeddings.position": "embeddings.position_embeddings",
        "embeddings.token_type": "embeddings.token_type_embeddings",
        "embeddings.norm": "embeddings.LayerNorm",
        "layers.{i}.attn.q": f"{layer}.attention.self.query",
        "layers.{i}.attn.k": f"{layer}.attention.self.key",
        "layers.{i}.attn.v": f"{layer}.attention.self.value",
        "layers.{i}.attn.o": f"{layer}.attention.output.dense",
        "layers.{i}.attn_norm": f"{layer}.attention.output.LayerNorm",
        "layers.{i}.mlp.up": f"{layer}.intermediate.dense",
        "layers.{i}.mlp.down": f"{layer}.output.dense",
        "layers.{i}.mlp_norm": f"{layer}.output.LayerNorm",
    }


FAMILY = EncoderFamily(
    name="bert", config=config, names=names, base_prefix="bert.",
    head=lambda hf: Head(dense="bert.pooler.dense", activation="tanh", out="classifier"),
    unused=("pooler.", "bert.pooler.", "embeddings.position_ids", "bert.embeddings.position_ids", "cls."))


def load_bert(model_dir, weights: str = "fp32"):
    """This rank's shard of the BERT checkpoint in `model_dir`: forward(input_ids, attention_mask[,
    token_type_ids]) -> last_hidden_state. A `func` for parallel_model_trace via functools.partial."""
    from .encoders import load_hidden_states

    return load_hidden_states(model_dir, weights)
