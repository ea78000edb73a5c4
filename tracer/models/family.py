"""What an encoder family is: a small description read by the one encoder (models/encoder.py).

A family says how its Hugging Face config becomes an EncoderConfig, what the checkpoint calls each of
our weights (`layers.{i}.attn.q` -> `encoder.layer.{i}.attention.self.query`; a part of a fused tensor
as (name, first row, rows)), where a *ForSequenceClassification checkpoint keeps the base model
(`bert.`), and what its classification head is. Adding a family is one such file and one line in
models/registry.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from .encoder import EncoderConfig


@dataclass(frozen=True)
class Head:
    """A sequence-classification head: pool the tokens (the first token, or the mean), then an optional
    dense layer with its activation and an optional norm, then the output projection to the labels.
    Names are the checkpoint's, whole (the head sits outside the base model's prefix)."""

    out: str = "classifier"
    dense: str | None = None
    activation: str = "tanh"
    norm: str | None = None
    pooling: str = "cls"


@dataclass(frozen=True)
class EncoderFamily:
    name: str
    config: Callable[[object], EncoderConfig]   # from transformers' config object of the checkpoint
    names: Callable[[EncoderConfig], dict]      # our module path (layer as {i}) -> the checkpoint's
    base_prefix: str                            # the base model's prefix in a *ForSequenceClassification
    head: Callable[[object], Head] | None = None  # None: embeddings only
    unused: tuple[str, ...] = ()                 # checkpoint keys of no use here (poolers, LM heads, buffers)
    tasks: tuple[str, ...] = field(default=("embedding", "classification"))

    def checkpoint_names(self, state_keys, c: EncoderConfig, prefix: str) -> dict:
        """{our state key: checkpoint key or (key, first row, rows)} for every key of the model."""
        table = self.names(c)
        out = {}
        for key in state_keys:
            path, leaf = key.rsplit(".", 1)
            match = re.match(r"(.*?)\.(\d+)\.(.*)", path)
            pattern, layer = (f"{match[1]}.{{i}}.{match[3]}", int(match[2])) if match else (path, None)
            if pattern not in table:
                raise KeyError(f"family {self.name}: no checkpoint name for {pattern}")
            ref = table[pattern]
            name, rows = (ref, None) if isinstance(ref, str) else (ref[0], ref[1:])
            full = f"{prefix}{name.format(i=layer)}.{leaf}"
            out[key] = full if rows is None else (full, *rows)
        return out


@dataclass(frozen=True)
class DecoderFamily:
    """A generation family over the one decoder (models/decoder.py): its DecoderConfig fields from the
    Hugging Face config, its rotary tables, what its checkpoint calls the weights that are not named as
    Llama's (fused projections as row ranges), and its checkpoint keys of no use."""

    name: str
    architecture: str                                # the *ForCausalLM the manifest names
    config: Callable[[object], dict]                 # DecoderConfig's fields (not the build's)
    rotaries: Callable[[object, object], list]       # (hf config, DecoderConfig) -> [Rotary], one per kind
    names: Callable[[object], dict] = lambda c: {}   # our key -> the checkpoint's, or (its key, first row, rows)
    unused: tuple[str, ...] = ()
    text_config: Callable[[object], object] = lambda hf: hf  # a multimodal config's text part (Gemma 3 4B+)
