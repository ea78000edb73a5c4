"""The trace `func`s that build one rank's shard of an encoder checkpoint of any family of
models/registry.py: the encoder alone (per-token hidden states), a sentence embedder
(sentence-transformers modules), or a sequence classifier / cross-encoder (*ForSequenceClassification)."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ..parallel_layers import backend, load
from ..parallel_layers.checkpoint import checkpoint_keys
from . import registry
from .classifier import ClassifierHead, PackedSequenceClassifier, SequenceClassifier
from .encoder import Encoder, EncoderConfig, quantize, to_bfloat16
from .family import EncoderFamily
from .sentence import DenseLayers, PackedSentenceEmbedding, SentenceEmbedding, sentence_transformers_settings

WEIGHTS = ("fp32", "bf16", "int8")


def checkpoint_file(model_dir: Path) -> Path:
    """model.safetensors, else pytorch_model.bin (read with weights_only: no code runs)."""
    model_dir = Path(model_dir)
    file = model_dir / "model.safetensors"
    return file if file.is_file() else model_dir / "pytorch_model.bin"


def hf_config(model_dir: Path):
    """The checkpoint's config as transformers reads it (older spellings of a family's keys normalised)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(model_dir))


def is_classifier(config: dict) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or [])


def encoder_config(model_dir: Path) -> tuple[EncoderFamily, EncoderConfig, object]:
    hf = hf_config(model_dir)
    family = registry.family(hf.model_type)
    return family, family.config(hf), hf


def _base_prefix(keys: set[str], family: EncoderFamily, c: EncoderConfig) -> str:
    """"" where the checkpoint holds the base model at its top (BertModel, a sentence-transformers save),
    else the family's prefix (BertForSequenceClassification: "bert.", a CausalLM: "model.")."""
    word = family.names(c)["embeddings.word"] + ".weight"
    return "" if word in keys else family.base_prefix


def _built(model: nn.Module, encoder: Encoder, weights: str) -> None:
    """After loading: fused projections and the weights' format (tpserve's CPU kernels)."""
    if weights not in WEIGHTS:
        raise ValueError(f"encoder weights are {', '.join(WEIGHTS)}, got {weights!r}")
    if backend.NAME == "cpu":  # loaded by the checkpoint's names, run fused (neuronx_distributed's compiler
        encoder.fuse()         # fuses on its own)
    if weights == "int8":
        quantize(encoder)
    elif weights == "bf16":
        to_bfloat16(encoder)
    model.eval()


def load_hidden_states(model_dir, weights: str = "fp32") -> tuple[Encoder, dict]:
    """A `func` for parallel_model_trace: load_encoder's model (per-token hidden states, padded rows)."""
    return load_encoder(model_dir, weights), {}


def load_encoder(model_dir, weights: str = "fp32") -> Encoder:
    """This rank's shard of the encoder in `model_dir` (any family of models/registry.py): forward(input_ids,
    attention_mask[, token_type_ids]) -> last_hidden_state [B, S, H]; packed(...) -> [T, H]."""
    family, c, _ = encoder_config(model_dir)
    encoder = Encoder(c)
    file = checkpoint_file(model_dir)
    keys = checkpoint_keys(file)
    names = family.checkpoint_names(encoder.state_dict(), c, _base_prefix(keys, family, c))
    load(str(file), encoder, aliases=names, ignore_unexpected=family.unused)
    _built(encoder, encoder, weights)
    return encoder


def load_sentence_model(model_dir, packed: bool = False, weights: str = "fp32") -> tuple[nn.Module, dict]:
    """A `func` for parallel_model_trace: this rank's shard of a sentence-transformers model, taking
    padded rows (SentenceEmbedding) or texts packed end to end (PackedSentenceEmbedding)."""
    settings = sentence_transformers_settings(Path(model_dir))
    dense = DenseLayers(Path(model_dir), settings["dense"]) if settings["dense"] else None
    encoder = load_encoder(model_dir, weights)
    return (PackedSentenceEmbedding if packed else SentenceEmbedding)(encoder, settings, dense).eval(), {}


def load_classifier(model_dir, packed: bool = False, weights: str = "fp32") -> tuple[nn.Module, dict]:
    """A `func` for parallel_model_trace: this rank's shard of a *ForSequenceClassification checkpoint (a
    cross-encoder: query-document pairs), padded rows or packed texts -> logits per label."""
    family, c, hf = encoder_config(model_dir)
    if family.head is None:
        raise ValueError(f"{hf.model_type}: sequence classification is not supported")
    file = checkpoint_file(model_dir)
    keys = checkpoint_keys(file)
    encoder = Encoder(c)
    spec = family.head(hf)
    head = ClassifierHead(spec, c.hidden_size, hf.num_labels, lambda name: f"{name}.bias" in keys, c.norm_eps)
    model = (PackedSequenceClassifier if packed else SequenceClassifier)(encoder, head)
    names = {f"encoder.{k}": v for k, v in
             family.checkpoint_names(encoder.state_dict(), c, _base_prefix(keys, family, c)).items()}
    names |= {f"head.{k}": v for k, v in head.names().items()}
    load(str(file), model, aliases=names, ignore_unexpected=family.unused)
    _built(model, encoder, weights)
    return model, {}


def labels(model_dir: Path) -> dict:
    """A classifier's labels and how its scores are read: {"id2label": [names by index], "multi_label"}."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    id2label = config.get("id2label") or {}
    count = len(id2label) or int(config.get("num_labels", 1))
    names = [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(count)]
    return {"id2label": names, "multi_label": config.get("problem_type") == "multi_label_classification"}
