"""Sentence embeddings as sentence-transformers computes them: the encoder, its Pooling (every mode,
include_prompt), Dense modules, Normalize.

sentence_transformers_settings() reads a checkpoint directory's modules.json, 1_Pooling/config.json,
the Dense modules' configs, sentence_bert_config.json (max_seq_length, do_lower_case) and
config_sentence_transformers.json (prompts, default_prompt_name), so the traced model returns exactly
what SentenceTransformer(dir).encode(..., prompt_name=...) returns. Padding never changes a result:
padded positions are excluded from attention and from the pooling.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import pooling

# Dense activations by the class name sentence-transformers saves ("torch.nn.modules.activation.Tanh").
DENSE_ACTIVATIONS = {"Tanh": torch.tanh, "Identity": lambda x: x, "ReLU": F.relu, "GELU": F.gelu,
                     "Sigmoid": torch.sigmoid, "SiLU": F.silu}
MODULES = ("Transformer", "Pooling", "Dense", "Normalize")


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return value


def sentence_transformers_settings(model_dir: Path) -> dict | None:
    """What the sentence-transformers modules of `model_dir` do, as plain JSON for the manifest, or None
    without modules.json: {"pooling": [modes], "include_prompt", "dense": [{"path", "in", "out", "bias",
    "activation", "residual"}], "normalize", "prompts", "default_prompt_name", "do_lower_case",
    "max_seq_length" (None: not set)}. ValueError for a module or setting we cannot reproduce."""
    model_dir = Path(model_dir)
    if not (model_dir / "modules.json").is_file():
        return None
    modules = json.loads((model_dir / "modules.json").read_text())
    types = [m["type"].rsplit(".", 1)[-1] for m in modules]
    if unsupported := [t for t in types if t not in MODULES]:
        raise ValueError(f"sentence-transformers modules {unsupported} are not supported (supported: {list(MODULES)})")
    if types[:2] != ["Transformer", "Pooling"]:
        raise ValueError(f"sentence-transformers modules {types}: expected Transformer, then Pooling")
    settings = {"pooling": ["mean"], "include_prompt": True, "dense": [], "normalize": "Normalize" in types,
                "prompts": {}, "default_prompt_name": None, "do_lower_case": False, "max_seq_length": None}
    for module, kind in zip(modules, types, strict=True):
        folder = model_dir / module.get("path", "")
        if kind == "Pooling":
            settings["pooling"], settings["include_prompt"] = pooling.modes_of(_json(folder / "config.json"))
        elif kind == "Dense":
            config = _json(folder / "config.json")
            activation = str(config.get("activation_function", "torch.nn.modules.activation.Tanh")).rsplit(".", 1)[-1]
            if activation not in DENSE_ACTIVATIONS:
                raise ValueError(f"{module['path']}: Dense activation {activation!r} is not supported "
                                 f"(supported: {sorted(DENSE_ACTIVATIONS)})")
            settings["dense"].append({"path": module["path"], "in": config["in_features"],
                                      "out": config["out_features"], "bias": config.get("bias", True),
                                      "activation": activation, "residual": config.get("use_residual", False)})
        elif kind == "Normalize" and types.index("Normalize") != len(types) - 1:
            raise ValueError("sentence-transformers Normalize must be the last module")
    bert_config = model_dir / "sentence_bert_config.json"
    if bert_config.is_file():
        config = _json(bert_config)
        settings["do_lower_case"] = bool(config.get("do_lower_case", False))
        if isinstance(config.get("max_seq_length"), int) and config["max_seq_length"] > 0:
            settings["max_seq_length"] = config["max_seq_length"]
    st_config = model_dir / "config_sentence_transformers.json"
    if st_config.is_file():
        config = _json(st_config)
        settings["prompts"] = {k: v or "" for k, v in (config.get("prompts") or {}).items()}
        settings["default_prompt_name"] = config.get("default_prompt_name")
        if settings["default_prompt_name"] not in (None, *settings["prompts"]):
            raise ValueError(f"default_prompt_name {settings['default_prompt_name']!r} is not one of the prompts "
                             f"{sorted(settings['prompts'])}")
    return settings


class DenseLayers(nn.Module):
    """sentence-transformers' Dense modules in order: activation(linear(x)) (+ x, or a projection of it,
    with use_residual)."""

    def __init__(self, model_dir: Path, dense: list[dict]) -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        self.activations = [DENSE_ACTIVATIONS[d["activation"]] for d in dense]
        self.residual = [d["residual"] for d in dense]
        for d in dense:
            layer = nn.Module()
            layer.linear = nn.Linear(d["in"], d["out"], bias=d["bias"])
            if d["residual"] and d["in"] != d["out"]:
                layer.residual = nn.Linear(d["in"], d["out"], bias=False)
            state = _module_weights(Path(model_dir) / d["path"])
            layer.load_state_dict(state)
            self.layers.append(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer, activation, residual in zip(self.layers, self.activations, self.residual, strict=True):
            out = activation(layer.linear(x))
            if residual:
                out = out + (layer.residual(x) if hasattr(layer, "residual") else x)
            x = out
        return x


def _module_weights(folder: Path) -> dict:
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(str(folder / "model.safetensors"))
    return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)


class SentenceEmbedding(nn.Module):
    """forward(input_ids, attention_mask, token_type_ids, pool [B, S]) -> [B, dimension]: padded rows;
    `pool` is the attention mask with a prompt's tokens zeroed where the Pooling excludes them."""

    def __init__(self, encoder: nn.Module, settings: dict, dense: DenseLayers | None) -> None:
        super().__init__()
        self.encoder, self.modes, self.normalize = encoder, list(settings["pooling"]), settings["normalize"]
        self.dense = dense

    def finish(self, pooled: torch.Tensor) -> torch.Tensor:
        if self.dense is not None:
            pooled = self.dense(pooled)
        return F.normalize(pooled, p=2.0, dim=-1) if self.normalize else pooled

    def forward(self, input_ids, attention_mask, token_type_ids, pool):
        tokens = self.encoder(input_ids, attention_mask, token_type_ids)
        return self.finish(pooling.pool_padded(self.modes, tokens, pool * attention_mask))


class PackedSentenceEmbedding(SentenceEmbedding):
    """forward(input_ids, positions, token_types, pool [T], lengths [R]) -> [R, dimension]: up to R texts
    packed end to end (text r: the next lengths[r] tokens; an absent text has length 0, tokens after
    the last text are padding), each pooled over its own tokens. The same results as SentenceEmbedding,
    without computing a padded token (Encoder.packed)."""

    def forward(self, input_ids, positions, token_types, pool, lengths):
        ends = lengths.cumsum(0)
        offsets = torch.cat([torch.zeros_like(ends[:1]), ends])
        tokens = self.encoder.packed(input_ids, positions, token_types, offsets)
        return self.finish(pooling.pool_packed(self.modes, tokens, positions, pool, offsets[:-1], ends))
