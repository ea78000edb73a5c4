"""One decoder LLM for every generation family (models/llama.py, qwen2.py, qwen3.py, mistral.py,
gemma3.py, phi3.py describe theirs: norms, attention pattern, positions, MLP, names), built from
tracer.parallel_layers, with the KV cache as `states`.

One forward serves prefill and token generation:

    forward(input_ids [b, L], positions [b, L], slots [b], last [b]) -> (logits [b, vocab], *caches)

Row i's tokens sit at `positions[i]` of cache row `slots[i]`; their keys and values are written there
in place (index_put_ on the cache buffers: O(new tokens), never a copy of the cache), then the row
attends to the first `context` positions of its cache row, masked causally by position (and, in a
sliding-window layer, to the last W positions only). Only the hidden state at `last[i]` goes through
the LM head (a verify graph's: every token's, for prompt-lookup decoding). `context` is fixed per
traced graph: a prefill graph of L tokens attends L positions (up to 512 tokens on the CPU backend:
the whole cache row, a chunk graph), a generation graph of one token attends its context bucket.

The caches are non-persistent buffers returned as outputs and named in `states`: the runtime
allocates them (zeros) once per rank at load, shares them between all graphs of the rank, and the
graph's own in-place write is the update (the returned tensor is the buffer itself). A sliding
layer's cache may be a ring of its last positions (DecoderConfig.ring) where every graph attends
through tpserve::cached_attention.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..parallel_layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear, backend, load, parallel_state
from ..parallel_layers.backend import project
from ..parallel_layers.checkpoint import checkpoint_keys
from ..parallel_layers.cpu_layers import FusedLinear
from ..parallel_layers.heads import HeadLayout, head_column_linear, head_row_linear
from ..runtime import native_ops


@dataclass
class DecoderConfig:
    """What the decoder is (the family's description of a checkpoint, models/<family>.py) and how it is
    built (max_batch, max_context, weights). Plain JSON: the manifest records it."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    qk_norm: bool = False             # Qwen3, Gemma 3: an RMS norm over each head of q and k, before rotation
    sandwich_norms: bool = False      # Gemma: the attention's and the MLP's outputs normed too (4 norms a layer)
    norm_offset: float = 0.0          # Gemma: its norms scale by (1 + weight), stored as weight
    embedding_scale: float = 1.0      # Gemma: the embeddings times sqrt(hidden_size)
    attention_scale: float = 0.0      # 0: head_dim ** -0.5 (Gemma: query_pre_attn_scalar ** -0.5)
    activation: str = "silu"          # the gated MLP's: silu (SwiGLU) or gelu_tanh (GeGLU)
    rotary_dim: int = 0               # 0: head_dim (Phi-3 and Phi-4-mini turn a part of each head)
    windows: list[int] = field(default_factory=list)     # per layer: W, the last W positions only; -1 all
    layer_rope: list[int] = field(default_factory=list)  # per layer: its rotary table (Gemma: local, global)
    final_logit_softcapping: float = 0.0  # logits = cap * tanh(logits / cap) where > 0
    max_batch: int = 4          # rows of one generation step; the cache has one more (scratch) row
    max_context: int = 1024     # positions per cache row
    weights: str = "fp32"       # or "int8" / "int4" (groups of 32, LM head int8 in both): weight-only
    ring_span: int = 0          # > 0: sliding layers keep a ring of W + ring_span - 1 positions (ring())

    def __post_init__(self) -> None:
        self.rotary_dim = self.rotary_dim or self.head_dim
        self.windows = list(self.windows) or [-1] * self.num_hidden_layers
        self.layer_rope = list(self.layer_rope) or [0] * self.num_hidden_layers
        if self.activation not in _GATES:
            raise ValueError(f"activation {self.activation!r} is not supported ({', '.join(_GATES)})")

    def ring(self, layer: int) -> int:
        """The ring of a sliding layer's cache, or 0 (a cache of max_context positions). With ring_span set
        (the most positions one call writes: the largest prompt graph), a layer of window W keeps
        positions p at p % R, R = W + ring_span - 1 (what a call's queries read survives its own writes),
        in R + W - 1 positions (csrc/decoder_ops.cpp mirrors the first W - 1 so that a window is one run);
        where that is not less than max_context, the whole row."""
        window = self.windows[layer]
        ring = window + self.ring_span - 1
        return ring if self.ring_span > 0 and window > 0 and ring + window - 1 < self.max_context else 0


@dataclass
class Rotary:
    """One rotary table: inv_freq and the attention scaling of the cos / sin (Hugging Face's rope
    parameters); `long`, where the family switches (Phi-3's longrope): the table for sequences longer
    than `switch` positions."""

    inv_freq: torch.Tensor
    scaling: float = 1.0
    long: Rotary | None = None
    switch: int = 0


def rope_parameters(model_dir: Path) -> tuple[torch.Tensor, float]:
    """inv_freq and attention scaling as the checkpoint's Hugging Face model computes them (default,
    linear, llama3, yarn ... scaling); length-dependent ("dynamic") scaling is refused. The formulas
    come from transformers.modeling_rope_utils, as LlamaRotaryEmbedding's do (importing that class
    costs each trace worker ~2 s more)."""
    from transformers import AutoConfig

    return rope_of(AutoConfig.from_pretrained(str(model_dir)))


def rope_of(config, layer_type: str | None = None, dim: int | None = None, seq_len: int | None = None
            ) -> tuple[torch.Tensor, float]:
    """rope_parameters from a transformers config object: of one layer type's parameters (Gemma 3 has
    two), else the config's; `dim`: the rotated size (a partial rotary), else head_dim; `seq_len`: for
    longrope, the sequence length its factors are chosen for."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = (config.rope_parameters[layer_type] if layer_type else getattr(config, "rope_parameters", None)) or {}
    rope_type = rope.get("rope_type", "default")
    if "dynamic" in rope_type:
        raise ValueError(f"rope_type {rope_type!r} depends on the sequence length; not supported")
    if rope_type == "default":  # LlamaRotaryEmbedding.compute_default_rope_parameters
        dim = dim or getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        inv_freq, scaling = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    else:
        extra = {"seq_len": seq_len} if rope_type == "longrope" else {}
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, layer_type=layer_type, **extra)
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


_GATES = {"silu": (F.silu, native_ops.swiglu),
          "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), native_ops.geglu)}


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
    """x rotated over its first cos.size(-1) values (all of them, but for a partial rotary)."""
    if _CPU_BACKEND:
        return native_ops.rope(x, cos, sin)
    turn, half = cos.shape[-1], cos.shape[-1] // 2
    part = x[..., :turn]
    rotated = part * cos + torch.cat((-part[..., half:], part[..., :half]), dim=-1) * sin
    return rotated if turn == x.shape[-1] else torch.cat((rotated, x[..., turn:]), dim=-1)


class Attention(nn.Module):
    def __init__(self, c: DecoderConfig, layer: int) -> None:
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
        if c.qk_norm:  # one weight per head dimension, the same for every head: replicated
            self.q_norm, self.k_norm = RMSNorm(hd, c.rms_norm_eps), RMSNorm(hd, c.rms_norm_eps)
        self.qk_norm, self.eps = c.qk_norm, c.rms_norm_eps
        self.scale = c.attention_scale or hd ** -0.5
        self.window = c.windows[layer]  # the last W positions (a sliding layer), or -1: every position
        self.fused = False
        self.register_buffer("kv_index", torch.tensor(layout.kv_index), persistent=False)
        group = layout.local_heads // layout.local_kv
        # query head i reads KV head i // group: SDPA's grouped-query attention, no widening copy
        self.grouped = layout.kv_index == [i // group for i in range(layout.local_heads)]
        self.max_batch = c.max_batch
        # [row, KV head, position, D]: each KV head's keys in one run (what SDPA reads, and what a step's
        # attention streams); + 1 row: the scratch row of idle rows. A sliding layer's ring: its last
        # positions only (DecoderConfig.ring)
        self.ring = c.ring(layer)
        positions = self.ring + self.window - 1 if self.ring else c.max_context
        shape = (c.max_batch + 1, layout.local_kv, positions, hd)
        self.register_buffer("cache_k", torch.zeros(shape), persistent=False)
        self.register_buffer("cache_v", torch.zeros(shape), persistent=False)

    def fuse(self) -> None:
        """After loading: q, k and v as one projection."""
        self.qkv_proj = FusedLinear([self.q_proj, self.k_proj, self.v_proj])
        del self.q_proj, self.k_proj, self.v_proj
        self.fused = True

    def forward(self, x, cos, sin, positions, slots, masks, rows):
        b, length, _ = x.shape
        if _native_attention(length):  # one op normalizes, rotates, writes and reads the cache rows in place
            qkv = (self.qkv_proj(x, rows, split=False) if self.fused
                   else torch.cat((self.q_proj(x), self.k_proj(x), self.v_proj(x)), -1))
            out = native_ops.cached_attention(
                qkv, cos, sin, self.cache_k, self.cache_v, slots, positions, self.kv_index, self.context, self.scale,
                self.window, self.q_norm.weight if self.qk_norm else None,
                self.k_norm.weight if self.qk_norm else None, self.eps, self.ring)
            return project(self.o_proj, out, rows)
        if self.ring:
            raise ValueError(f"a ring cache is read by tpserve::cached_attention only (up to "
                             f"{_NATIVE_ATTENTION_TOKENS} tokens a call), not by {length} tokens through SDPA")
        q, k, v = self.qkv_proj(x, rows) if self.fused else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        q = q.view(b, length, self.local_heads, self.head_dim)
        k = k.view(b, length, self.local_kv, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
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
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=masks[self.window],
                                             enable_gqa=self.grouped, scale=self.scale)
        return project(self.o_proj, out.transpose(1, 2).reshape(b, length, self.local_heads * self.head_dim), rows)


class Mlp(nn.Module):
    def __init__(self, c: DecoderConfig) -> None:
        super().__init__()
        self.gate_proj = ColumnParallelLinear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias, gather_output=False)
        self.up_proj = ColumnParallelLinear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias, gather_output=False)
        self.down_proj = RowParallelLinear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias, input_is_parallel=True)
        self.act, self.gated = _GATES[c.activation]
        self.fused = False

    def fuse(self) -> None:
        """After loading: gate and up as one projection."""
        self.gate_up_proj = FusedLinear([self.gate_proj, self.up_proj])
        del self.gate_proj, self.up_proj
        self.fused = True

    def forward(self, x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        if self.fused:  # tpserve's layers (CPU): one op for the split, the activation and the product
            return project(self.down_proj, self.gated(self.gate_up_proj(x, rows, split=False)), rows)
        return project(self.down_proj, self.act(self.gate_proj(x)) * self.up_proj(x), rows)


class DecoderLayer(nn.Module):
    """Llama's layer: x + attn(norm(x)), then x + mlp(norm(x)); with sandwich norms (Gemma) the
    attention's and the MLP's outputs are normed too, under Gemma's names (its post_attention_layernorm
    norms the attention's output; pre_feedforward_layernorm is the MLP's input norm)."""

    def __init__(self, c: DecoderConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(c, layer)
        self.mlp = Mlp(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        if c.sandwich_norms:
            self.pre_feedforward_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
            self.post_feedforward_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.sandwich, self.rope = c.sandwich_norms, c.layer_rope[layer]

    def forward(self, x, cos, sin, positions, slots, masks, rows):
        attended = self.self_attn(self.input_layernorm(x), cos, sin, positions, slots, masks, rows)
        if not self.sandwich:
            x = x + attended
            return x + self.mlp(self.post_attention_layernorm(x), rows)
        x = x + self.post_attention_layernorm(attended)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x), rows))


class Decoder(nn.Module):
    """This rank's shard of a causal LM (module names follow Hugging Face's Llama, so most checkpoints
    load by name: model.layers.N.self_attn.q_proj.weight, ...; a family maps the others)."""

    def __init__(self, c: DecoderConfig, rotaries: list[Rotary]) -> None:
        super().__init__()
        self.config = c
        self.model = nn.Module()
        self.model.embed_tokens = ParallelEmbedding(c.vocab_size, c.hidden_size)
        self.model.layers = nn.ModuleList(DecoderLayer(c, i) for i in range(c.num_hidden_layers))
        self.model.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = ColumnParallelLinear(c.hidden_size, c.vocab_size, bias=False, gather_output=True)
        # rope's cos and sin for every position, computed as the forward computed them per call (the same
        # elementwise ops: the same bits); a step looks up its rows instead of running ~10 small ops. One
        # table per kind of layer (Gemma 3: local and global), two where the family switches (longrope).
        self.switch = []
        for kind, rotary in enumerate(rotaries):
            for suffix, table in (("", rotary), ("_long", rotary.long)):
                if table is None:
                    continue
                freqs = torch.arange(c.max_context).unsqueeze(-1).float() * table.inv_freq
                angles = torch.cat((freqs, freqs), dim=-1)
                self.register_buffer(f"rope_cos_{kind}{suffix}", angles.cos() * table.scaling, persistent=False)
                self.register_buffer(f"rope_sin_{kind}{suffix}", angles.sin() * table.scaling, persistent=False)
            self.switch.append(rotary.switch if rotary.long is not None else 0)
        self.context = 0  # set_context, per traced graph
        self.every_logit = False  # a verify graph: logits at every position (set_context too)

    def set_context(self, context: int, every_logit: bool = False) -> None:
        """The positions each graph traced next attends (a bucket's), and whether it returns the logits
        at every position (a verify graph) or at `last` only."""
        self.context, self.every_logit = context, every_logit
        for layer in self.model.layers:
            layer.self_attn.context = context

    def caches(self) -> list[torch.Tensor]:
        return [t for layer in self.model.layers for t in (layer.self_attn.cache_k, layer.self_attn.cache_v)]

    def _rotations(self, positions: torch.Tensor, last: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(cos, sin) [b, L, 1, rotary_dim] per kind of layer. A longrope table switches to its long
        factors for a row whose sequence reaches past `switch` positions (Hugging Face's choice for a
        sequence; per row, so a row's tokens do not depend on the rows beside it; a prompt's bucket
        padding does not count)."""
        out = []
        for kind, switch in enumerate(self.switch):
            cos = F.embedding(positions, getattr(self, f"rope_cos_{kind}")).unsqueeze(2)
            sin = F.embedding(positions, getattr(self, f"rope_sin_{kind}")).unsqueeze(2)
            if switch:
                long = (positions.gather(1, last.view(-1, 1)) + 1 > switch).view(-1, 1, 1, 1)
                long_cos = F.embedding(positions, getattr(self, f"rope_cos_{kind}_long")).unsqueeze(2)
                long_sin = F.embedding(positions, getattr(self, f"rope_sin_{kind}_long")).unsqueeze(2)
                cos, sin = torch.where(long, long_cos, cos), torch.where(long, long_sin, sin)
            out.append((cos, sin))
        return out

    def forward(self, input_ids, positions, slots, last):
        x = self.model.embed_tokens(input_ids)
        if self.config.embedding_scale != 1.0:
            x = x * self.config.embedding_scale
        rotations = self._rotations(positions, last)
        # causal by position, once for every layer (and every window): row i's token at p attends cache
        # positions <= p (> p - W in a sliding layer); not needed where the layers attend through
        # tpserve::cached_attention
        masks = {}
        if not _native_attention(input_ids.shape[1]):
            key_positions = (torch.ones_like(positions[0, :1]).expand(self.context).cumsum(0) - 1).view(1, 1, -1)
            for window in set(self.config.windows):
                seen = key_positions <= positions.unsqueeze(-1)
                if window > 0:
                    seen = seen & (key_positions > positions.unsqueeze(-1) - window)
                masks[window] = seen.unsqueeze(1)  # [b, 1, L, context]
        # a prompt's bucket: the linears compute its real tokens only (the padding's outputs are zeros,
        # which the cache positions past the prompt hold until generation overwrites them)
        b, length = input_ids.shape
        rows = last + 1 if b == 1 and length > 1 else None
        for layer in self.model.layers:
            cos, sin = rotations[layer.rope]
            x = layer(x, cos, sin, positions, slots, masks, rows)
        # only the rows' last real tokens reach the LM head
        if length == 1:  # a step: each row's one token
            x = x[:, 0]
        elif b == 1 and self.every_logit:  # drafts to verify: every position's next token
            x = x[0]
        elif b == 1:  # a prompt
            x = x[0].index_select(0, last)
        else:
            x = x[torch.arange(b), last]
        logits = self.lm_head(self.model.norm(x))
        if self.config.final_logit_softcapping:
            cap = self.config.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return (logits, *self.caches())


def checkpoint_file(model_dir: Path) -> Path:
    return Path(model_dir) / "model.safetensors"


def load_decoder(model_dir, runtime: dict, context: int, every_logit: bool = False) -> tuple[nn.Module, dict]:
    """A `func` for parallel_model_trace: this rank's shard, the weights read slice by slice from
    model_dir/model.safetensors, and the caches as states ({cache: output index})."""
    checkpoint = checkpoint_file(model_dir).stat()
    shard = (parallel_state.get_tensor_model_parallel_size(), parallel_state.get_tensor_model_parallel_rank())
    model = _built(Path(model_dir), tuple(sorted(runtime.items())), shard, (checkpoint.st_size, checkpoint.st_mtime_ns))
    model.set_context(context, every_logit)
    return model, {cache: 1 + i for i, cache in enumerate(model.caches())}


def _prefix(keys: set[str]) -> str:
    """Where the checkpoint keeps the decoder: "" (a *ForCausalLM) or e.g. "language_model." (Gemma 3's
    4B and larger checkpoints)."""
    found = sorted(k for k in keys if k.endswith("model.embed_tokens.weight"))
    return found[0][: -len("model.embed_tokens.weight")] if found else ""


# One model per process, the last one built: a build's buckets differ only in `context`, so a rank
# reads, fuses and quantizes the weights once instead of once per bucket (SmolLM2 int4: 35 graphs).
@functools.lru_cache(maxsize=1)
def _built(model_dir: Path, runtime: tuple, shard: tuple, checkpoint_stamp: tuple) -> Decoder:
    from transformers import AutoConfig

    from . import registry

    runtime = dict(runtime)
    hf = AutoConfig.from_pretrained(str(model_dir))
    family = registry.generator(hf.model_type)
    hf = family.text_config(hf)
    config = DecoderConfig(**family.config(hf), **runtime)
    if config.weights != "fp32" and not _CPU_BACKEND:
        raise ValueError(f"weights={config.weights!r} needs tpserve's CPU kernels; {backend.NAME} builds fp32")
    model = Decoder(config, family.rotaries(hf, config))
    file = checkpoint_file(model_dir)
    prefix = _prefix(checkpoint_keys(file))
    names = dict(family.names(config))  # our key -> the checkpoint's, or (its key, first row, rows): a fused part
    if config.tie_word_embeddings:
        names["lm_head.weight"] = "model.embed_tokens.weight"
    aliases = {prefix + k: prefix + v if isinstance(v, str) else (prefix + v[0], *v[1:]) for k, v in names.items()}
    load(str(file), model, prefix=prefix, ignore_unexpected=(f"{prefix}model.rotary_emb", *family.unused),
         aliases=aliases)
    if config.weights != "fp32":
        _attach_grids(model, model_dir, prefix, names)
    if config.norm_offset:  # Gemma's norms scale by (1 + weight): stored as the scale itself
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, RMSNorm):
                    module.weight.add_(config.norm_offset)
    if config.tie_word_embeddings and model.lm_head.weight.shape == model.model.embed_tokens.weight.shape:
        model.lm_head.weight = model.model.embed_tokens.weight  # one tensor, stored once (int8 re-splits them)
    for layer in model.model.layers:  # loaded by Hugging Face's names, run fused (one CPU kernel call;
        if _CPU_BACKEND:               # neuronx_distributed's compiler fuses on its own)
            layer.self_attn.fuse()
            layer.mlp.fuse()
    if config.weights != "fp32":  # the embedding stays fp32
        _quantize(model, config, model_dir, prefix, names)
    return model.eval()


def _attach_grids(model: Decoder, model_dir: Path, prefix: str, names: dict) -> None:
    """Each linear layer's part of its GGUF blocks' grids (builder/gguf_grids.py), as `grid` [this
    rank's rows, its features / 32]: the grids cut as the layer's own weight loader cuts its weight (heads,
    padding and all), from the grids widened back to the weight's shape."""
    from safetensors import safe_open

    from ..builder.gguf_grids import GRIDS_FILE
    from ..builder.gguf_import import TYPES_FILE, bits_of

    file = Path(model_dir) / GRIDS_FILE
    if not file.is_file():
        return
    types = json.loads((Path(model_dir) / TYPES_FILE).read_text())

    with safe_open(str(file), "pt") as grids:
        available = set(grids.keys())
        for name, module in model.named_modules():
            loader = getattr(getattr(module, "weight", None), "weight_loader", None)
            if loader is None or not hasattr(module, "quantize"):
                continue
            ref = names.get(f"{name}.weight", f"{name}.weight")
            key = prefix + (ref if isinstance(ref, str) else ref[0])
            if f"{key}.scale" not in available:
                continue
            parts = []
            for part in ("scale", "minimum"):
                full = grids.get_tensor(f"{key}.{part}")
                if not isinstance(ref, str):  # a fused tensor's rows
                    full = full.narrow(0, ref[1], ref[2])
                scratch = torch.zeros_like(module.weight)  # what the loader writes into: the weight's shape
                scratch.full_shape = getattr(module.weight, "full_shape", None)
                loader(scratch, full.repeat_interleave(32, dim=1))
                parts.append(scratch[:, ::32].contiguous())
            module.grid, module.grid_bits = tuple(parts), bits_of(types, key)


def _quantize(model: Decoder, config: DecoderConfig, model_dir: Path, prefix: str, names: dict) -> None:
    """int8 / int4: every linear layer and the LM head (int4 keeps an int8 head: at 4 bits SmolLM2's
    agreed with fp32 on 81 % of next tokens; its GGUF holds the head in Q8_0, not Q4_1). auto (a GGUF):
    each at the precision the file stored its weights in (builder/gguf_import.py's gguf_types.json); a
    fused projection at the finest of its parts'; fp32 where the file kept floats."""
    from ..builder.gguf_import import TYPES_FILE, bits_of

    types = json.loads((model_dir / TYPES_FILE).read_text()) if config.weights == "auto" else {}

    def bits(*ours: str) -> int:
        if config.weights != "auto":
            return {"int8": 8, "int4": 4}[config.weights]
        found = [bits_of(types, prefix + (ref if isinstance(ref, str) else ref[0]))
                 for ref in (names.get(f"{name}.weight", f"{name}.weight") for name in ours)]
        return 32 if None in found else max(found)

    plan = {model.lm_head: max(8, bits("lm_head"))}
    for i, layer in enumerate(model.model.layers):
        at = f"model.layers.{i}"
        attn, mlp = layer.self_attn, layer.mlp
        parts = [f"{at}.self_attn.{p}_proj" for p in "qkv"]
        plan |= {attn.qkv_proj: bits(*parts)} if attn.fused else {
            getattr(attn, f"{p}_proj"): bits(name) for p, name in zip("qkv", parts, strict=True)}
        plan[attn.o_proj] = bits(f"{at}.self_attn.o_proj")
        gate_up = [f"{at}.mlp.gate_proj", f"{at}.mlp.up_proj"]
        plan |= {mlp.gate_up_proj: bits(*gate_up)} if mlp.fused else {
            mlp.gate_proj: bits(gate_up[0]), mlp.up_proj: bits(gate_up[1])}
        plan[mlp.down_proj] = bits(f"{at}.mlp.down_proj")
    for module, module_bits in plan.items():
        if module_bits in (4, 8):  # on the file's grid where its blocks had this many bits or fewer
            fits = module_bits >= getattr(module, "grid_bits", 99)
            module.quantize(module_bits, grid=getattr(module, "grid", None) if fits else None)
