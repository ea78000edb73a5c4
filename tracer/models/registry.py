"""Which families tpserve builds, by config.json's model_type, and for which tasks: the one table the
offline tracer and `python -m tracer models` read (importing it needs no torch). A family's
description lives in the module named here (models/bert.py, ...); adding a family is that file and
one line below."""

from __future__ import annotations

import importlib

# model_type -> the module holding its EncoderFamily
ENCODERS = {"bert": "bert", "distilbert": "distilbert", "roberta": "roberta", "xlm-roberta": "roberta",
            "camembert": "roberta", "mpnet": "mpnet", "modernbert": "modernbert"}
# decoders that serve embeddings from a sentence-transformers folder (last-token pooling)
DECODER_EMBEDDERS = {"llama": "decoder_embedders", "mistral": "decoder_embedders", "qwen2": "decoder_embedders",
                     "qwen3": "decoder_embedders"}
# model_type -> the module holding its DecoderFamily (generation)
GENERATORS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "mistral": "mistral", "gemma3_text": "gemma3",
              "gemma3": "gemma3", "phi3": "phi3"}

TASKS = ("embedding", "classification", "generation")


def tasks(model_type: str) -> list[str]:
    """What a model_type is built for (classification: its *ForSequenceClassification checkpoints, rerankers
    among them; embedding for a decoder: with a sentence-transformers folder)."""
    out = []
    if model_type in ENCODERS or model_type in DECODER_EMBEDDERS:
        out.append("embedding")
    if model_type in ENCODERS:
        out.append("classification")
    if model_type in GENERATORS:
        out.append("generation")
    return out


def supported() -> str:
    """One line naming every model_type and its tasks (for error messages)."""
    types = sorted({*ENCODERS, *DECODER_EMBEDDERS, *GENERATORS})
    return ", ".join(f"{t} ({'/'.join(tasks(t))})" for t in types)


def family(model_type: str):
    """The EncoderFamily of an encoder or decoder-embedder model_type."""
    module = ENCODERS.get(model_type) or DECODER_EMBEDDERS[model_type]
    return importlib.import_module(f"{__package__}.{module}").FAMILY


def generator(model_type: str):
    """The DecoderFamily of a generation model_type."""
    return importlib.import_module(f"{__package__}.{GENERATORS[model_type]}").FAMILY
