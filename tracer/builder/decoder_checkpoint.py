"""Trace a Hugging Face decoder checkpoint (a generation family of models/registry.py: Llama, Qwen2,
Qwen3, Mistral, Gemma 3, Phi-3) into tensor-parallel shards for generation: prefill graphs bucketed by
prompt length and generation graphs bucketed by context length, all of a rank sharing one copy of its
weights and one KV cache.

Checks come first (architecture before files), as for encoders; the manifest then covers the
tokenizer too and carries what the generator needs (decoder shape, buckets, EOS ids).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import torch

from .. import artifacts
from ..bucketing import BucketModelConfig, check_buckets, decoder_bucket_kernel, powers_of_two, prompt_buckets
from ..errors import UsageError
from ..models import decoder as decoder_module
from ..models import registry
from ..models.decoder import DecoderConfig, load_decoder
from .gguf_import import TYPES_FILE
from .shards import trace_into_shards

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")
DEFAULT_BATCH = 4
DEFAULT_MAX_CONTEXT = 1024
# weight-only, groups of 32 with a scale and minimum (cpu_layers.py); auto: a GGUF's own, per tensor
WEIGHTS = ("fp32", "int8", "int4", "auto")


def check_decoder(model_dir: Path, config: dict, tp_degree: int, prefill: list[int] | None, batch_size: int | None,
                  max_context: int | None, weights: str = "fp32") -> tuple[DecoderConfig, list[int], list[int]]:
    """(decoder config, prefill buckets, context buckets), or UsageError."""
    if not (model_dir / "model.safetensors").is_file():
        raise UsageError(f"{model_dir}: no model.safetensors (decoders are read from one safetensors file)")
    if tp_degree < 1:
        raise UsageError(f"--tp-degree must be >= 1, got {tp_degree}")
    hf = hf_config(model_dir, config)
    positions = getattr(hf, "max_position_embeddings", None) or DEFAULT_MAX_CONTEXT
    if max_context is None:
        max_context = min(DEFAULT_MAX_CONTEXT, positions)
    if not 2 <= max_context <= positions:
        raise UsageError(f"--max-context must be in [2, max_position_embeddings={positions}], got {max_context}")
    batch_size = DEFAULT_BATCH if batch_size is None else batch_size
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    if weights not in WEIGHTS:
        raise UsageError(f"--weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    if weights == "auto" and not (model_dir / TYPES_FILE).is_file():
        raise UsageError("--weights auto keeps a GGUF file's own quantization: give --model a .gguf file")
    try:
        decoder = DecoderConfig(**registry.generator(config["model_type"]).config(hf), max_batch=batch_size,
                                max_context=max_context, weights=weights)
    except (KeyError, AttributeError, ValueError) as exc:
        raise UsageError(f"{model_dir}/config.json: {exc}") from None
    for name, size in (("intermediate_size", decoder.intermediate_size), ("vocab_size", decoder.vocab_size)):
        if size % tp_degree:
            raise UsageError(f"--tp-degree {tp_degree} does not divide {name}={size}")
    if decoder.num_attention_heads % decoder.num_key_value_heads:
        raise UsageError(f"{model_dir}: num_attention_heads is not a multiple of num_key_value_heads")
    try:
        prefill = check_buckets(prefill if prefill is not None else prompt_buckets(max_context))
    except ValueError as exc:
        raise UsageError(f"--{exc}") from None
    if prefill[-1] > max_context:
        raise UsageError(f"--buckets: {prefill[-1]} exceeds --max-context {max_context}")
    contexts = powers_of_two(min(128, max_context), max_context)
    return decoder, prefill, contexts


def hf_config(model_dir: Path, config: dict):
    """The checkpoint's config as transformers reads it (older keys normalised; a multimodal config's
    text part)."""
    from transformers import AutoConfig

    return registry.generator(config["model_type"]).text_config(AutoConfig.from_pretrained(str(model_dir)))


# Up to how many rows tpserve::linear sums each row as it sums a row alone (csrc/linear.cpp: from 9 rows
# on, with AVX-512, the column kernel sums in another order, the same for any 9 to 96 rows).
SAME_SUMS_AS_ONE_ROW = 8
VERIFY_TOKENS = SAME_SUMS_AS_ONE_ROW  # a verify graph's tokens: the last one and up to 7 drafts


def generation_rows(max_batch: int) -> list[int]:
    """Row counts of the generation graphs: 1, 2 and 4 below the batch, and the batch. A step runs the
    smallest graph that holds its rows, so one or two streams do not pay for the batch's idle rows
    (SmolLM2 int4, all 121 linears of a step on 2 threads: 1 row 3.76 ms, 2 rows 3.91, 3 rows 4.66, 4 rows
    5.36: the integer kernel's multiply-adds, not the weights' bytes, grow past 2 rows). A batch of more
    than SAME_SUMS_AS_ONE_ROW rows has the full graph only: a row's tokens never depend on the rows
    that happen to run with it."""
    if max_batch > SAME_SUMS_AS_ONE_ROW:
        return [max_batch]
    return sorted({rows for rows in (1, 2, 4) if rows < max_batch} | {max_batch})


def chunk_graph(length: int) -> bool:
    """Whether the prompt graph of `length` tokens attends the whole cache row at no cost: where
    tpserve::cached_attention computes it (the CPU backend, up to 512 tokens), whose work follows the
    tokens' positions, not the context; SDPA's (past 512 tokens, and on other backends) follows the
    context, so those graphs attend their own length only."""
    return decoder_module._native_attention(length)


def rope_switch(model_dir: Path, config: dict, decoder: DecoderConfig) -> int:
    """The sequence length past which the family switches its rotary factors, where that happens within
    the context (Phi-3's longrope past original_max_position_embeddings: every position of a longer
    sequence turns by the long factors), else 0. Such a model gets no chunk or verify graphs (a key cached
    from a shorter sequence is not what the longer one computes: no prefix caching, chunked prefill or
    prompt lookup), and its generator prefills a row's whole sequence again where it crosses the switch,
    as Hugging Face's generate() does."""
    family = registry.generator(config["model_type"])
    switches = [r.switch for r in family.rotaries(hf_config(model_dir, config), decoder) if r.long is not None]
    return min((s for s in switches if 0 < s < decoder.max_context), default=0)


def ring_plan(decoder: DecoderConfig, prefill: list[int], given: bool, reuse: bool) -> tuple[list[int], int]:
    """(prompt buckets, DecoderConfig.ring_span): sliding layers keep a ring of their last positions
    instead of max_context where every graph writes through tpserve::cached_attention (chunk graphs;
    not a model with a rotary switch, whose rows are prefilled whole again) and that saves memory. The
    default buckets then stop at the largest chunk graph (longer prompts prefill in pieces); buckets
    given past it keep whole caches."""
    chunks = [n for n in prefill if chunk_graph(n)]
    span = max([*chunks, VERIFY_TOKENS]) if chunks else 0
    trial = dataclasses.replace(decoder, ring_span=span)
    if not (reuse and span and any(trial.ring(i) for i in range(decoder.num_hidden_layers))):
        return prefill, 0
    if len(chunks) < len(prefill):
        if given:
            return prefill, 0
        prefill = chunks
    return prefill, span


def _eos_ids(model_dir: Path, config: dict) -> list[int]:
    eos = config.get("eos_token_id")
    generation = model_dir / "generation_config.json"
    if generation.is_file():
        eos = json.loads(generation.read_text()).get("eos_token_id", eos)
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def trace_decoder(model_dir: Path, config: dict, tp_degree: int, output: Path, prefill: list[int] | None = None,
                  batch_size: int | None = None, max_context: int | None = None,
                  max_parallel_compilations: int | None = None, weights: str = "fp32",
                  ring_caches: bool = True) -> artifacts.Manifest:
    """ring_caches=False: sliding layers keep max_context positions too (bench/ring_cache.py compares)."""
    model_dir, output = Path(model_dir), Path(output)
    given = prefill is not None
    decoder, prefill, contexts = check_decoder(model_dir, config, tp_degree, prefill, batch_size, max_context,
                                               weights)
    switch = rope_switch(model_dir, config, decoder)
    reuse = not switch  # a cached key stays what a whole prompt computes
    prefill, decoder.ring_span = ring_plan(decoder, prefill, given, reuse and ring_caches)
    runtime = {"max_batch": decoder.max_batch, "max_context": decoder.max_context, "weights": decoder.weights,
               "ring_span": decoder.ring_span}
    zeros = functools.partial(torch.zeros, dtype=torch.long)
    # inputs: token ids, positions, cache slots, index of each row's last token
    examples = [(zeros(1, n), torch.arange(n).unsqueeze(0), zeros(1), torch.tensor([n - 1]))  # one prompt per call
                for n in prefill]
    rows = generation_rows(decoder.max_batch)
    examples += [(zeros(r, 1), zeros(r, 1), torch.arange(r), zeros(r)) for r in rows for _ in contexts]  # 1 token/row
    # a prompt graph attends its own length, or (chunk graphs) the whole cache row, so that it can prefill
    # the rest of a prompt after a cached prefix (engine/prefix_cache.py) or a long prompt in pieces
    prefill_contexts = [decoder.max_context if reuse and chunk_graph(n) else n for n in prefill]
    kwargs = [{"runtime": runtime, "context": n} for n in prefill_contexts + contexts * len(rows)]
    # verify graphs (prompt-lookup decoding): a row's last token and its drafts, every position's logits,
    # attending the whole cache row; up to SAME_SUMS_AS_ONE_ROW tokens, so each position's logits are
    # summed as a one-token step sums them (greedy answers stay the same)
    verify = [VERIFY_TOKENS] if reuse and chunk_graph(VERIFY_TOKENS) and VERIFY_TOKENS < decoder.max_context else []
    examples += [(zeros(1, n), torch.arange(n).unsqueeze(0), zeros(1), torch.tensor([n - 1])) for n in verify]
    kwargs += [{"runtime": runtime, "context": decoder.max_context, "every_logit": True} for _ in verify]
    return trace_into_shards(
        functools.partial(load_decoder, model_dir), examples,
        BucketModelConfig(decoder_bucket_kernel(prefill, contexts, rows), func_kwargs=kwargs), tp_degree,
        max_parallel_compilations, model_dir, output, TOKENIZER_FILES, {
            "kind": "generation",
            "architecture": registry.generator(config["model_type"]).architecture,
            "decoder": vars(decoder),
            "prefill_buckets": prefill,
            "prefill_contexts": prefill_contexts,
            "context_buckets": contexts,
            "generation_rows": rows,
            "verify_tokens": verify,
            "rope_switch": switch,
            "eos_token_ids": _eos_ids(model_dir, config),
        })
