"""Qwen2 (Qwen2ForCausalLM): Llama with a bias on q, k and v (none on the output); sliding-window layers
where the checkpoint turns them on (use_sliding_window, from max_window_layers)."""

from __future__ import annotations

from . import llama
from .family import DecoderFamily


def config(hf) -> dict:
    return {**llama.config(hf), "qkv_bias": True, "o_bias": False, "windows": llama.windows(hf)}


FAMILY = DecoderFamily(name="qwen2", architecture="Qwen2ForCausalLM", config=config, rotaries=llama.rotaries)
