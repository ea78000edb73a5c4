"""Gemma 3 (Gemma3ForCausalLM; the text part of Gemma3ForConditionalGeneration, under language_model.):
layers alternate sliding-window attention (the last sliding_window positions, local RoPE base) and
global attention (global base), by layer_types; QK-norm; four RMS norms a layer (the attention's and the
MLP's outputs normed too), each scaling by (1 + weight); embeddings times sqrt(hidden_size); GeGLU (tanh
GELU); scores scaled by query_pre_attn_scalar ** -0.5; one KV head at 270M and 1B (replicated across
ranks); a tied 262k-token LM head."""

from __future__ import annotations

from . import llama
from .decoder import Rotary, rope_of
from .family import DecoderFamily

KINDS = ("sliding_attention", "full_attention")  # the rotary tables, by layer type


def config(hf) -> dict:
    return {**llama.config(hf), "qk_norm": True, "sandwich_norms": True, "norm_offset": 1.0,
            "embedding_scale": hf.hidden_size ** 0.5, "attention_scale": hf.query_pre_attn_scalar ** -0.5,
            "windows": llama.windows(hf), "layer_rope": [KINDS.index(t) for t in hf.layer_types],
            "final_logit_softcapping": hf.final_logit_softcapping or 0.0}


def rotaries(hf, c) -> list[Rotary]:
    return [Rotary(*rope_of(hf, layer_type=kind)) for kind in KINDS]


FAMILY = DecoderFamily(name="gemma3", architecture="Gemma3ForCausalLM", config=config, rotaries=rotaries,
                       text_config=lambda hf: getattr(hf, "text_config", hf),
                       unused=("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                               "model.multi_modal_projector."))
