"""ModernBERT (ModernBertModel, ModernBertForSequenceClassification): pre-norm layers without biases,
rotary positions, every third layer global and the others a local window of +-64 tokens (each with
its own rotary base), GeGLU, q / k / v and the GLU's two halves fused in the checkpoint.
gte-modernbert, nomic-modernbert."""

from __future__ import annotations

import torch

from .encoder import EncoderConfig
from .family import EncoderFamily, Head


def _inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def config(hf) -> EncoderConfig:
    kinds = ["full_attention", "sliding_attention"]
    head_dim = hf.hidden_size // hf.num_attention_heads
    rope = hf.rope_parameters
    for kind in kinds:
        if rope[kind].get("rope_type", "default") != "default":
            raise ValueError(f"ModernBERT {kind} rope_type {rope[kind]['rope_type']!r} is not supported")
    return EncoderConfig(
        vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads, norm_eps=hf.norm_eps,
        norm_bias=hf.norm_bias, pre_norm=True, first_attn_norm=False, final_norm=True,
        activation=hf.hidden_activation, glu=True, attention_bias=hf.attention_bias, mlp_bias=hf.mlp_bias,
        max_positions=0, rope=[(_inv_freq(rope[kind]["rope_theta"], head_dim), 1.0) for kind in kinds],
        layer_rope=[kinds.index(t) for t in hf.layer_types],
        windows=[hf.local_attention // 2 if t == "sliding_attention" else -1 for t in hf.layer_types])


def names(c: EncoderConfig) -> dict:
    size, inner = c.num_heads * c.head_dim, c.intermediate_size
    return {
        "embeddings.word": "embeddings.tok_embeddings",
        "embeddings.norm": "embeddings.norm",
        "layers.{i}.attn_norm": "layers.{i}.attn_norm",
        "layers.{i}.attn.q": ("layers.{i}.attn.Wqkv", 0, size),
        "layers.{i}.attn.k": ("layers.{i}.attn.Wqkv", size, size),
        "layers.{i}.attn.v": ("layers.{i}.attn.Wqkv", 2 * size, size),
        "layers.{i}.attn.o": "layers.{i}.attn.Wo",
        "layers.{i}.mlp_norm": "layers.{i}.mlp_norm",
        "layers.{i}.mlp.gate": ("layers.{i}.mlp.Wi", 0, inner),  # act(first half) * second half
        "layers.{i}.mlp.up": ("layers.{i}.mlp.Wi", inner, inner),
        "layers.{i}.mlp.down": "layers.{i}.mlp.Wo",
        "final_norm": "final_norm",
    }


FAMILY = EncoderFamily(
    name="modernbert", config=config, names=names, base_prefix="model.",
    head=lambda hf: Head(dense="head.dense", activation=hf.classifier_activation, norm="head.norm",
                         out="classifier", pooling=hf.classifier_pooling),
    unused=("head.", "decoder.", "model.head."))
