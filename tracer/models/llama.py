"""Llama (LlamaForCausalLM: SmolLM2, Llama 3, ...): the decoder as models/decoder.py builds it by default,
RoPE as the checkpoint scales it (default, linear, llama3, yarn). The other families start from here."""

from __future__ import annotations

from .decoder import Rotary, rope_of
from .family import DecoderFamily

GATES = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}


def config(hf) -> dict:
    """DecoderConfig's fields common to the Llama-shaped families."""
    heads = hf.num_attention_heads
    activation = getattr(hf, "hidden_act", None) or getattr(hf, "hidden_activation", "silu")
    if activation not in GATES:
        raise ValueError(f"activation {activation!r} is not supported ({', '.join(GATES)})")
    bias = bool(getattr(hf, "attention_bias", False))
    return dict(vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
                num_hidden_layers=hf.num_hidden_layers, num_attention_heads=heads,
                num_key_value_heads=getattr(hf, "num_key_value_heads", None) or heads,
                head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads,
                rms_norm_eps=getattr(hf, "rms_norm_eps", 1e-6), qkv_bias=bias, o_bias=bias,
                mlp_bias=bool(getattr(hf, "mlp_bias", False)),
                tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)), activation=GATES[activation])


def windows(hf) -> list[int]:
    """Per layer: the sliding window (the last W positions) of a "sliding_attention" layer, else -1."""
    types = getattr(hf, "layer_types", None) or ["full_attention"] * hf.num_hidden_layers
    return [hf.sliding_window if t == "sliding_attention" and hf.sliding_window else -1 for t in types]


def rotaries(hf, c) -> list[Rotary]:
    return [Rotary(*rope_of(hf))]


FAMILY = DecoderFamily(name="llama", architecture="LlamaForCausalLM", config=config, rotaries=rotaries)
