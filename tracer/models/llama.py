"""Decoder LLMs of the Llama family (LlamaForCausalLM; Qwen2 = Llama with q/k/v bias), built from
tracer.parallel_layers, with the KV cache as `states`.

One forward serves prefill and token generation:

    forward(input_ids [b, L], positions [b, L], slots [b], last [b]) -> (logits [b, vocab], *caches)

Row i's tokens sit at `positions[i]` of cache row `slots[i]`; their keys and values are written there
in place (index_put_ on the cache buffers: O(new tokens), never a copy of the cache), then the row
attends to the first `context` positions of its cache row, masked causally by position. Only the
hidden state at `last[i]` goes through the LM head. `context` is fixed per traced graph: a prefill
graph of L tokens attends L positions, a generation graph of one token attends its context bucket.

The caches are non-persistent buffers returned as outputs and named in `states`: the runtime
allocates them (zeros) once per rank at load, shares them between all graphs of the rank, and the
graph's own in-place write is the update (the returned tensor is the buffer itself).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..parallel_layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear, backend, load, parallel_state
from ..parallel_layers.backend import project
from ..parallel_layers.cpu_layers import FusedLinear
from ..parallel_layers.heads import HeadLayout, head_column_linear, head_row_linear
from ..runtime import native_ops

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


@dataclass
class DecoderConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    max_batch: int = 4          # rows of one generation step; the cache has one more (scratch) row
    max_context: int = 1024     # positions per cache row
    weights: str = "fp32"       # or "int8" / "int4" (groups of 32, LM head int8 in both): weight-only

    @classmethod
    def from_hf(cls, hf: dict, **runtime) -> DecoderConfig:
        heads = hf["num_attention_heads"]
        qwen2 = hf.get("model_type") == "qwen2"
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            qkv_bias=True if qwen2 else bool(hf.get("attention_bias", False)),
            o_bias=False if qwen2 else bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)), tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            **runtime)


def rope_parameters(model_dir: Path) -> tuple[torch.Tensor, float]:
    """inv_freq and attention scaling as the checkpoint's Hugging Face model computes them (default,
    linear, llama3, yarn ... scaling); length-dependent ("dynamic") scaling is refused. The formulas
    come from transformers.modeling_rope_utils, as LlamaRotaryEmbedding's do (importing that class
    costs each trace worker ~2 s more)."""
    from transformers import AutoConfig

    return rope_of(AutoConfig.from_pretrained(str(model_dir)))


def rope_of(config) -> tuple[torch.Tensor, float]:
    """rope_parameters from a transformers config object."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    if "dynamic" in rope_type or "longrope" in rope_type:
        raise ValueError(f"rope_type {rope_type!r} depends on the sequence length; not supported")
    if rope_type == "default":  # LlamaRotaryEmbedding.compute_default_rope_parameters
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        inv_freq, scaling = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    else:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config)
    return inv_freq.float().clone(), float(scaling)


# On the CPU backend the norm and the rotation are one tpserve op each (csrc/decoder_ops.cpp: a step
# runs ~60 of each on a few hundred numbers, where the op count is the cost) and the projections are
# fused and may be quantized (tpserve's kernels); on neuronx_distributed the same formulas in plain
# torch ops, unfused, fp32, for its compiler.
_CPU_BACKEND = backend.NAME == "cpu"
# Up to this many tokens per row (generation steps, and prompts up to it) attention is one
# tpserve::cached_attention op (q/k rotation, cache write and attention; one task per token and
# group of query heads over its own keys) instead of a split, two rotations, a cache write, a mask and
# SDPA. SmolLM2's attention at tp 1, 2 threads, prompts of 40 / 128 / 256 / 512 tokens: 258 -> 63,
# 682 -> 308, 1768 -> 1127, 5252 -> 4488 us; at 1024 SDPA is ahead (15.9 vs 17.3 ms). A generation
# step's 30 layers at ~100 positions: ~20 -> ~8 us each.
_NATIVE_ATTENTION_TOKENS = 512


def _native_attention(length: int) -> bool:
    """Whether `length` tokens per row attend through tpserve::cached_attention (which masks
    causally itself) rather than SDPA with the model's mask."""
    return _CPU_BACKEND and length <= _NATIVE_ATTENTION_TOKENS


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _CPU_BACKEND:
            return native_ops.rms_norm(x, self.weight, self.eps)
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    if _CPU_BACKEND:
        return native_ops.rope(x, cos, sin)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, c: DecoderConfig) -> None:
        super().__init__()
        tp, rank = parallel_state.get_tensor_model_parallel_size(), parallel_state.get_tensor_model_parallel_rank()
        layout = HeadLayout(c.num_attention_heads, c.num_key_value_heads, tp, rank)
        hd, self.head_dim = c.head_dim, c.head_dim
        self.context = 0  # positions attended: Decoder.set_context, per traced graph
        self.local_heads, self.local_kv = layout.local_heads, layout.local_kv
        self.q_proj = head_column_linear(c.hidden_size, c.num_attention_heads, layout.first_head,
                                         layout.local_heads, hd, c.qkv_bias)
        self.k_proj = head_column_linear(c.hidden_size, c.num_key_value_heads, layout.first_kv,
                                         layout.local_kv, hd, c.qkv_bias)
        self.v_proj = head_column_linear(c.hidden_size, c.num_key_value_heads, layout.first_kv,
                                         layout.local_kv, hd, c.qkv_bias)
        self.o_proj = head_row_linear(c.num_attention_heads, layout.first_head, layout.local_heads, hd,
                                      c.hidden_size, c.o_bias)
        self.fused = False
        self.register_buffer("kv_index", torch.tensor(layout.kv_index), persistent=False)
        group = layout.local_heads // layout.local_kv
        # query head i reads KV head i // group: SDPA's grouped-query attention, no widening copy
        self.grouped = layout.kv_index == [i // group for i in range(layout.local_heads)]
        self.max_batch = c.max_batch
        # [row, KV head, position, D]: each KV head's keys in one run (what SDPA reads, and what a step's
        # attention streams); + 1 row: the scratch row of idle rows
        shape = (c.max_batch + 1, layout.local_kv, c.max_context, hd)
        self.register_buffer("cache_k", torch.zeros(shape), persistent=False)
        self.register_buffer("cache_v", torch.zeros(shape), persistent=False)

    def fuse(self) -> None:
        """After loading: q, k and v as one projection."""
        self.qkv_proj = FusedLinear([self.q_proj, self.k_proj, self.v_proj])
        del self.q_proj, self.k_proj, self.v_proj
        self.fused = True

    def forward(self, x, cos, sin, positions, slots, mask, rows):
        b, length, _ = x.shape
        if _native_attention(length):  # one op rotates, writes and reads the cache rows in place
            qkv = (self.qkv_proj(x, rows, split=False) if self.fused
                   else torch.cat((self.q_proj(x), self.k_proj(x), self.v_proj(x)), -1))
            out = native_ops.cached_attention(qkv, cos, sin, self.cache_k, self.cache_v, slots, positions,
                                              self.kv_index, self.context, self.head_dim ** -0.5)
            return project(self.o_proj, out, rows)
        q, k, v = self.qkv_proj(x, rows) if self.fused else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        q = _rotate(q.view(b, length, self.local_heads, self.head_dim), cos, sin)
        k = _rotate(k.view(b, length, self.local_kv, self.head_dim), cos, sin)
        v = v.view(b, length, self.local_kv, self.head_dim)
        cache_rows = slots.unsqueeze(1).expand(b, length)
        self.cache_k.transpose(1, 2).index_put_((cache_rows, positions), k)  # in place: O(new tokens)
        self.cache_v.transpose(1, 2).index_put_((cache_rows, positions), v)
        # this graph's window of the cache rows, without a copy where the layout allows: one row (a
        # prompt, or a lone generation row) is a view of its cache row; a full generation step reads
        # row i's cache row i, as the generator puts each row at its slot in the full graph (idle rows
        # write to the scratch row and their output is not used); anything else gathers its rows
        if b == 1:
            keys = self.cache_k.narrow(0, slots[0], 1)[:, :, : self.context]
            values = self.cache_v.narrow(0, slots[0], 1)[:, :, : self.context]
        elif length == 1 and b == self.max_batch:
            keys, values = self.cache_k[:b, :, : self.context], self.cache_v[:b, :, : self.context]
        else:
            keys = self.cache_k[:, :, : self.context].index_select(0, slots)
            values = self.cache_v[:, :, : self.context].index_select(0, slots)
        if not self.grouped:  # padded or overlapping heads: widen KV heads to the local query heads
            keys, values = keys.index_select(1, self.kv_index), values.index_select(1, self.kv_index)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask, enable_gqa=self.grouped)
        return project(self.o_proj, out.transpose(1, 2).reshape(b, length, self.local_heads * self.head_dim), rows)


class Mlp(nn.Module):
    def __init__(self, c: DecoderConfig) -> None:
        super().__init__()
        self.gate_proj = ColumnParallelLinear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias, gather_output=False)
        self.up_proj = ColumnParallelLinear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias, gather_output=False)
        self.down_proj = RowParallelLinear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias, input_is_parallel=True)
        self.fused = False

    def fuse(self) -> None:
        """After loading: gate and up as one projection."""
        self.gate_up_proj = FusedLinear([self.gate_proj, self.up_proj])
        del self.gate_proj, self.up_proj
        self.fused = True

    def forward(self, x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        if self.fused:  # tpserve's layers (CPU): one op for the split, the SiLU and the product
            return project(self.down_proj, native_ops.swiglu(self.gate_up_proj(x, rows, split=False)), rows)
        return project(self.down_proj, F.silu(self.gate_proj(x)) * self.up_proj(x), rows)


class DecoderLayer(nn.Module):
    def __init__(self, c: DecoderConfig) -> None:
        super().__init__()
        self.self_attn = Attention(c)
        self.mlp = Mlp(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, cos, sin, positions, slots, mask, rows):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, slots, mask, rows)
        return x + self.mlp(self.post_attention_layernorm(x), rows)


class Decoder(nn.Module):
    """This rank's shard of a Llama-family causal LM (module names follow Hugging Face's, so a
    checkpoint loads by name: model.layers.N.self_attn.q_proj.weight, ...)."""

    def __init__(self, c: DecoderConfig, inv_freq: torch.Tensor, attention_scaling: float) -> None:
        super().__init__()
        self.config = c
        self.model = nn.Module()
        self.model.embed_tokens = ParallelEmbedding(c.vocab_size, c.hidden_size)
        self.model.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.model.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = ColumnParallelLinear(c.hidden_size, c.vocab_size, bias=False, gather_output=True)
        # rope's cos and sin for every position, computed as the forward computed them per call (the same
        # elementwise ops: the same bits); a step looks up its rows instead of running ~10 small ops
        freqs = torch.arange(c.max_context).unsqueeze(-1).float() * inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("rope_cos", angles.cos() * attention_scaling, persistent=False)
        self.register_buffer("rope_sin", angles.sin() * attention_scaling, persistent=False)
        self.context = 0  # set_context, per traced graph

    def set_context(self, context: int) -> None:
        """The positions each graph traced next attends (a bucket's; nothing else depends on it)."""
        self.context = context
        for layer in self.model.layers:
            layer.self_attn.context = context

    def caches(self) -> list[torch.Tensor]:
        return [t for layer in self.model.layers for t in (layer.self_attn.cache_k, layer.self_attn.cache_v)]

    def forward(self, input_ids, positions, slots, last):
        x = self.model.embed_tokens(input_ids)
        cos = F.embedding(positions, self.rope_cos).unsqueeze(2)  # [b, L, 1, head_dim]
        sin = F.embedding(positions, self.rope_sin).unsqueeze(2)
        # causal by position, once for every layer: row i's token at p attends cache positions <= p
        # (not needed where the layers attend through tpserve::cached_attention)
        mask = None
        if not _native_attention(input_ids.shape[1]):
            key_positions = torch.ones_like(positions[0, :1]).expand(self.context).cumsum(0) - 1
            mask = (key_positions.view(1, 1, -1) <= positions.unsqueeze(-1)).unsqueeze(1)  # [b, 1, L, context]
        # a prompt's bucket: the linears compute its real tokens only (the padding's outputs are zeros,
        # which the cache positions past the prompt hold until generation overwrites them)
        b, length = input_ids.shape
        rows = last + 1 if b == 1 and length > 1 else None
        for layer in self.model.layers:
            x = layer(x, cos, sin, positions, slots, mask, rows)
        # only the rows' last real tokens reach the LM head
        if length == 1:  # a step: each row's one token
            x = x[:, 0]
        elif b == 1:  # a prompt
            x = x[0].index_select(0, last)
        else:
            x = x[torch.arange(b), last]
        return (self.lm_head(self.model.norm(x)), *self.caches())


def read_hf_config(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())


def checkpoint_file(model_dir: Path) -> Path:
    return Path(model_dir) / "model.safetensors"


def load_decoder(model_dir, runtime: dict, context: int) -> tuple[nn.Module, dict]:
    """A `func` for parallel_model_trace: this rank's shard, the weights read slice by slice from
    model_dir/model.safetensors, and the caches as states ({cache: output index})."""
    checkpoint = checkpoint_file(model_dir).stat()
    shard = (parallel_state.get_tensor_model_parallel_size(), parallel_state.get_tensor_model_parallel_rank())
    model = _built(Path(model_dir), tuple(sorted(runtime.items())), shard, (checkpoint.st_size, checkpoint.st_mtime_ns))
    model.set_context(context)
    return model, {cache: 1 + i for i, cache in enumerate(model.caches())}


# One model per process, the last one built: a build's buckets differ only in `context`, so a rank
# reads, fuses and quantizes the weights once instead of once per bucket (SmolLM2 int4: 35 graphs).
@functools.lru_cache(maxsize=1)
def _built(model_dir: Path, runtime: tuple, shard: tuple, checkpoint_stamp: tuple) -> Decoder:
    runtime = dict(runtime)
    config = DecoderConfig.from_hf(read_hf_config(model_dir), **runtime)
    if config.weights != "fp32" and not _CPU_BACKEND:
        raise ValueError(f"weights={config.weights!r} needs tpserve's CPU kernels; {backend.NAME} builds fp32")
    inv_freq, scaling = rope_parameters(model_dir)
    model = Decoder(config, inv_freq, scaling)
    aliases = {"lm_head.weight": "model.embed_tokens.weight"} if config.tie_word_embeddings else {}
    load(str(checkpoint_file(model_dir)), model, ignore_unexpected=("model.rotary_emb",), aliases=aliases)
    if config.tie_word_embeddings and model.lm_head.weight.shape == model.model.embed_tokens.weight.shape:
        model.lm_head.weight = model.model.embed_tokens.weight  # one tensor, stored once (int8 re-splits them)
    for layer in model.model.layers:  # loaded by Hugging Face's names, run fused (one CPU kernel call;
        if _CPU_BACKEND:               # neuronx_distributed's compiler fuses on its own)
            layer.self_attn.fuse()
            layer.mlp.fuse()
    if config.weights != "fp32":  # every linear layer and the LM head; the embedding stays fp32
        bits = {"int8": 8, "int4": 4}[config.weights]
        for module in model.modules():
            if module is model.lm_head:  # int4 keeps an int8 head: at 4 bits SmolLM2's agreed with fp32 on
                module.quantize(8)       # 81 % of next tokens (its GGUF holds the head in Q8_0, not Q4_1)
            elif hasattr(module, "quantize"):
                module.quantize(bits)
    return model.eval()
