"""Trace a Hugging Face encoder checkpoint directory (any family of models/registry.py) into
tensor-parallel shards: a sentence embedder (a sentence-transformers folder), a sequence classifier or
cross-encoder (*ForSequenceClassification), or a plain encoder (per-token hidden states).

Output (SHARDS_DIR): what parallel_model_save writes, plus tokenizer/ (the checkpoint's tokenizer
files); the manifest is then rewritten to cover those too and to carry the model info the engine
needs (task, pooling, prompts, labels, max_seq_length, ...): one verified manifest for everything served.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import torch

from .. import artifacts
from ..bucketing import (
    BucketModelConfig,
    check_buckets,
    half_steps,
    packed_token_buckets,
    packed_tokens_bucket_kernel,
    sequence_length_bucket_kernel,
)
from ..errors import UsageError
from ..models.encoders import labels, load_classifier, load_hidden_states, load_sentence_model
from ..models.sentence import sentence_transformers_settings
from ..parallel_layers import backend
from .model_source import model_kind, read_config
from .shards import trace_into_shards

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
PACKED_INPUTS = 4  # input_ids, positions, token types, pooling mask [tokens]; then lengths [texts]


def _tokenizer_limit(model_dir: Path) -> int | None:
    """tokenizer_config.json's model_max_length, where it is a real limit (not transformers' 1e30)."""
    file = model_dir / "tokenizer_config.json"
    try:
        value = json.loads(file.read_text()).get("model_max_length") if file.is_file() else None
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None
    return int(value) if isinstance(value, (int, float)) and 0 < value < 1e6 else None


def max_seq_length(model_dir: Path, settings: dict | None, position_limit: int) -> int:
    """Where sentence-transformers truncates: its max_seq_length, else the tokenizer's model_max_length;
    never past the positions the model has."""
    for value in ((settings or {}).get("max_seq_length"), _tokenizer_limit(model_dir)):
        if value:
            return min(value, position_limit)
    return position_limit


def _position_limit(config: dict) -> int:
    """Tokens the model can place: learned positions less their offset (RoBERTa's first is
    padding_idx + 1), or a rotary model's max_position_embeddings."""
    limit = config.get("max_position_embeddings") or 512
    if config.get("model_type") in ("roberta", "xlm-roberta", "camembert", "mpnet"):
        limit -= config.get("pad_token_id", 1) + 1
    return limit


def check_checkpoint(model_dir: Path, tp_degree: int, buckets: list[int] | None, batch_size: int,
                     max_parallel_compilations: int | None = None,
                     layout: str | None = None, weights: str = "fp32") -> tuple[dict, list[int], int, str]:
    """Everything that can be wrong, checked before tracing, the family first. Returns (HF config,
    buckets, max_seq_length, layout). layout None: packed for a sentence-transformers model or a
    classifier on the CPU backend, else padded (a plain encoder's output is per token;
    neuronx_distributed's compiler has no tpserve::packed_attention). buckets=None: padded 16, 32, 48,
    ... up to max_seq_length; packed, tokens per call: the same, then on up to batch_size texts' worth
    (at most 1024, packed_token_buckets)."""
    config = read_config(model_dir)
    kind = model_kind(config, model_dir)
    if kind == "generation":
        raise UsageError(f"{model_dir}: a {config['model_type']} checkpoint is a generation model")
    if not any((model_dir / f).is_file() for f in ("model.safetensors", "pytorch_model.bin")):
        raise UsageError(f"{model_dir}: no model.safetensors or pytorch_model.bin")
    if not (model_dir / "tokenizer.json").is_file():
        raise UsageError(f"{model_dir}: no tokenizer.json (a fast tokenizer file is required)")
    try:
        sentence = sentence_transformers_settings(model_dir)
    except (ValueError, KeyError) as exc:
        raise UsageError(f"{model_dir}: {exc}") from None
    per_token = kind == "embedding" and sentence is None
    if layout not in (None, "packed", "padded"):
        raise UsageError(f"--layout must be packed or padded, got {layout!r}")
    if layout == "packed" and per_token:
        raise UsageError(f"--layout packed: {model_dir} is a plain encoder (no sentence-transformers modules.json); "
                         "its per-token output is served padded")
    if layout == "packed" and backend.NAME != "cpu":  # tpserve::packed_attention is a CPU op
        raise UsageError(f"--layout packed needs tpserve's CPU backend; {backend.NAME} traces padded rows")
    layout = layout or ("packed" if not per_token and backend.NAME == "cpu" else "padded")
    if tp_degree < 1:
        raise UsageError(f"--tp-degree must be >= 1, got {tp_degree}")
    inner = config.get("intermediate_size") or config.get("hidden_dim")
    if isinstance(inner, int) and inner % tp_degree:  # attention heads are padded; the MLP is split evenly
        raise UsageError(f"--tp-degree {tp_degree} does not divide the MLP's intermediate size {inner}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    check_weights(config, tp_degree, weights)
    max_tokens = max_seq_length(model_dir, sentence, _position_limit(config))
    try:
        # half steps: a text is padded by at most a half (measured: batches of mixed texts 1.06x faster
        # than with powers of two, docs/performance-notes.md)
        if buckets is None:
            buckets = packed_token_buckets(max_tokens, batch_size) if layout == "packed" else half_steps(16, max_tokens)
        buckets = check_buckets(buckets)
    except ValueError as exc:
        raise UsageError(f"--{exc}") from None
    if layout == "packed" and buckets[-1] > batch_size * max_tokens:
        raise UsageError(f"--buckets: {buckets[-1]} tokens is more than one call holds ({batch_size} texts "
                         f"(--batch-size) of up to {max_tokens} tokens)")
    if layout == "padded" and buckets[-1] > _position_limit(config):
        raise UsageError(f"--buckets: {buckets[-1]} exceeds the model's {_position_limit(config)} positions")
    if max_parallel_compilations is not None and max_parallel_compilations < 1:
        raise UsageError(f"--max-parallel-compilations must be >= 1, got {max_parallel_compilations}")
    return config, buckets, max_tokens, layout


def check_weights(config: dict, tp_degree: int, weights: str) -> None:
    """fp32, or bf16 / int8 (models/encoder.py): tpserve's CPU kernels; int8's groups of 32 input
    features lie inside each rank's shard."""
    if weights not in ("fp32", "bf16", "int8"):
        raise UsageError(f"--weights {weights}: embedding and classification models take fp32, bf16 or int8")
    if weights == "fp32":
        return
    if backend.NAME != "cpu":
        raise UsageError(f"--weights {weights} needs tpserve's CPU kernels; {backend.NAME} builds fp32")
    for name in ("hidden_size", "intermediate_size") if weights == "int8" else ():
        size = config.get(name) or config.get({"hidden_size": "dim", "intermediate_size": "hidden_dim"}[name])
        if size // tp_degree % 32 or size % tp_degree:
            raise UsageError(f"--weights {weights}: {name}={size} / tp {tp_degree} is not a multiple of 32 "
                             "(the weights' groups)")


def _bf16_gemm_in_hardware() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AMX tiles or AVX-512 BF16); unknown counts as yes."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    return "amx_bf16" in flags or "avx512_bf16" in flags


def check_output_dir(path: Path, flag: str = "--output") -> None:
    """A directory we can create or write into, checked without writing anything."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path}: exists and is not a directory")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{flag} {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: {existing} is not writable")


def _dimension(config: dict, sentence: dict | None) -> int:
    """The length of each answer vector: the last Dense module's output, else pooled modes x hidden size."""
    hidden = config.get("hidden_size") or config.get("dim")
    if sentence is None:
        return hidden
    if sentence["dense"]:
        return sentence["dense"][-1]["out"]
    return hidden * len(sentence["pooling"])


def trace_checkpoint(model_dir: Path, tp_degree: int, buckets: list[int] | None, output: Path, batch_size: int = 1,
                     max_parallel_compilations: int | None = None, func=None,
                     layout: str | None = None, weights: str = "fp32") -> artifacts.Manifest:
    """func: a module-level builder to trace instead of the checkpoint's own (a variant of the model).
    layout: "packed" (texts end to end, no padding computed; the default for sentence-transformers
    models and classifiers), "padded" (rows of one bucket length; a plain encoder). batch_size: rows
    per call, or packed, texts per call. buckets=None: check_checkpoint's. weights: fp32, bf16 or int8."""
    output = Path(output)
    config, buckets, max_tokens, layout = check_checkpoint(model_dir, tp_degree, buckets, batch_size,
                                                           max_parallel_compilations, layout, weights)
    check_output_dir(Path(output))
    if weights == "bf16" and not _bf16_gemm_in_hardware():
        print("warning: this CPU has neither AMX nor AVX-512 BF16: --weights bf16 runs no faster than fp32 here "
              "(it pays where the model is served on one that has them)", file=sys.stderr)
    if buckets[-1] < max_tokens:
        print(f"warning: the largest bucket ({buckets[-1]}) is below the model's max_seq_length ({max_tokens}): "
              f"longer texts will be truncated to {buckets[-1]} tokens, not where sentence-transformers "
              "truncates", file=sys.stderr)
    kind = model_kind(config, model_dir)
    sentence = sentence_transformers_settings(model_dir) if kind == "embedding" else None
    packed = layout == "packed"
    if func is not None:
        pass
    elif kind == "classification":
        func = functools.partial(load_classifier, model_dir, packed, weights)
    elif sentence is not None:
        func = functools.partial(load_sentence_model, model_dir, packed, weights)
    else:
        func = functools.partial(load_hidden_states, model_dir, weights)
    if packed:  # every graph: up to batch_size texts; example texts of 1 token each
        examples = [(torch.ones(n, dtype=torch.long), torch.zeros(n, dtype=torch.long),
                     torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long),
                     torch.ones(batch_size, dtype=torch.long)) for n in buckets]
        kernel = packed_tokens_bucket_kernel(buckets, batch_size, PACKED_INPUTS)
    else:
        inputs = 2 if kind == "embedding" and sentence is None else 4  # + token types, pooling mask
        examples = [tuple(torch.ones(batch_size, n, dtype=torch.long) for _ in range(inputs)) for n in buckets]
        kernel = sequence_length_bucket_kernel(buckets)
    info = {
        "kind": kind,
        "family": config["model_type"],
        "layout": layout,
        "weights": weights,
        "texts_per_call": batch_size,
        "output": "logits" if kind == "classification" else "sentence_embedding" if sentence else "last_hidden_state",
        "sentence_transformers": sentence,
        "max_seq_length": max_tokens,
        "dimension": len(labels(model_dir)["id2label"]) if kind == "classification" else _dimension(config, sentence),
        "token_types": bool(config.get("type_vocab_size", 0) > 1),
    }
    if kind == "classification":
        info["labels"] = labels(model_dir)
    return trace_into_shards(func, examples, BucketModelConfig(kernel), tp_degree, max_parallel_compilations,
                             model_dir, output, TOKENIZER_FILES, info)

