"""Qwen3 (Qwen3ForCausalLM): Llama with an RMS norm over each head of q and k before the rotation, and a
head_dim of its own (not hidden_size / heads)."""

from __future__ import annotations

from . import llama
from .family import DecoderFamily


def config(hf) -> dict:
    return {**llama.config(hf), "qk_norm": True, "windows": llama.windows(hf)}


FAMILY = DecoderFamily(name="qwen3", architecture="Qwen3ForCausalLM", config=config, rotaries=llama.rotaries)
