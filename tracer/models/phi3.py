"""Phi-3, Phi-3.5 and Phi-4-mini (Phi3ForCausalLM): Llama's layers with q, k and v in one fused qkv_proj
and gate and up in one gate_up_proj (split here into the column-parallel parts each rank slices),
a partial rotary (partial_rotary_factor: the first part of each head turns), longrope (short factors up
to original_max_position_embeddings positions, long factors past them) and, where set, a sliding window
on every layer."""

from __future__ import annotations

from . import llama
from .decoder import Rotary, rope_of
from .family import DecoderFamily


def config(hf) -> dict:
    factor = hf.rope_parameters.get("partial_rotary_factor", 1.0)
    head_dim = hf.hidden_size // hf.num_attention_heads
    window = getattr(hf, "sliding_window", None) or -1
    return {**llama.config(hf), "rotary_dim": int(head_dim * factor), "windows": [window] * hf.num_hidden_layers}


def rotaries(hf, c) -> list[Rotary]:
    rope = hf.rope_parameters
    if rope.get("rope_type", "default") != "longrope":
        return [Rotary(*rope_of(hf, dim=c.rotary_dim))]
    switch = rope["original_max_position_embeddings"]
    return [Rotary(*rope_of(hf), long=Rotary(*rope_of(hf, seq_len=switch + 1)), switch=switch)]


def names(c) -> dict:
    q, kv, inner = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.intermediate_size
    attention, mlp = "model.layers.{i}.self_attn", "model.layers.{i}.mlp"
    out = {}
    for i in range(c.num_hidden_layers):
        a, m = attention.format(i=i), mlp.format(i=i)
        out |= {f"{a}.q_proj.weight": (f"{a}.qkv_proj.weight", 0, q),
                f"{a}.k_proj.weight": (f"{a}.qkv_proj.weight", q, kv),
                f"{a}.v_proj.weight": (f"{a}.qkv_proj.weight", q + kv, kv),
                f"{m}.gate_proj.weight": (f"{m}.gate_up_proj.weight", 0, inner),
                f"{m}.up_proj.weight": (f"{m}.gate_up_proj.weight", inner, inner)}
    return out


FAMILY = DecoderFamily(name="phi3", architecture="Phi3ForCausalLM", config=config, rotaries=rotaries, names=names)
