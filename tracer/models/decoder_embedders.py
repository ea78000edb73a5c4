"""Decoders used as embedders (Llama, Mistral, Qwen2, Qwen3 checkpoints with a sentence-transformers
last-token pooling config, as Qwen3-Embedding and e5-mistral): the decoder's pre-norm layers with
RMSNorm, rotary positions and SwiGLU, attending causally (Mistral: within its sliding window), no
KV cache and no LM head; the sentence is pooled from the hidden states after the final norm."""

from __future__ import annotations

from .decoder import rope_of
from .encoder import EncoderConfig
from .family import EncoderFamily


def config(hf) -> EncoderConfig:
    qwen2 = hf.model_type == "qwen2"
    heads = hf.num_attention_heads
    window = getattr(hf, "sliding_window", None) if hf.model_type == "mistral" else None
    return EncoderConfig(
        vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers, num_heads=heads, num_kv_heads=getattr(hf, "num_key_value_heads", 0) or heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads, norm="rms", norm_eps=hf.rms_norm_eps,
        pre_norm=True, embedding_norm=False, final_norm=True, activation=hf.hidden_act, glu=True,
        attention_bias=qwen2 or bool(getattr(hf, "attention_bias", False)),
        o_bias=False if qwen2 else bool(getattr(hf, "attention_bias", False)),
        mlp_bias=bool(getattr(hf, "mlp_bias", False)), qk_norm=hf.model_type == "qwen3", max_positions=0,
        rope=[rope_of(hf)], windows=[window - 1 if window else -1] * hf.num_hidden_layers, causal=True)


def names(c: EncoderConfig) -> dict:
    layer = "layers.{i}"
    table = {
        "embeddings.word": "embed_tokens",
        "layers.{i}.attn_norm": f"{layer}.input_layernorm",
        "layers.{i}.attn.q": f"{layer}.self_attn.q_proj",
        "layers.{i}.attn.k": f"{layer}.self_attn.k_proj",
        "layers.{i}.attn.v": f"{layer}.self_attn.v_proj",
        "layers.{i}.attn.o": f"{layer}.self_attn.o_proj",
        "layers.{i}.mlp_norm": f"{layer}.post_attention_layernorm",
        "layers.{i}.mlp.gate": f"{layer}.mlp.gate_proj",
        "layers.{i}.mlp.up": f"{layer}.mlp.up_proj",
        "layers.{i}.mlp.down": f"{layer}.mlp.down_proj",
        "final_norm": "norm",
    }
    if c.qk_norm:
        table |= {"layers.{i}.attn.q_norm": f"{layer}.self_attn.q_norm",
                  "layers.{i}.attn.k_norm": f"{layer}.self_attn.k_norm"}
    return table


FAMILY = EncoderFamily(name="decoder", config=config, names=names, base_prefix="model.", head=None,
                       unused=("lm_head.", "rotary_emb.", "model.rotary_emb."), tasks=("embedding",))
