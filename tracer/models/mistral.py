"""Mistral (MistralForCausalLM): Llama's weights; every layer attends to the last `sliding_window`
positions only, where the checkpoint sets one."""

from __future__ import annotations

from . import llama
from .family import DecoderFamily


def config(hf) -> dict:
    window = getattr(hf, "sliding_window", None) or -1
    return {**llama.config(hf), "windows": [window] * hf.num_hidden_layers}


FAMILY = DecoderFamily(name="mistral", architecture="MistralForCausalLM", config=config, rotaries=llama.rotaries)
