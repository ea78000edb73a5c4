"""One transformer encoder for every encoder family (BERT, DistilBERT, RoBERTa / XLM-R, MPNet, ModernBERT)
and for decoders used as embedders (Llama, Qwen2, Qwen3 with causal attention), built from
tracer.parallel_layers. A family (models/bert.py, models/modernbert.py, ...) is a small description: an
EncoderConfig read from its Hugging Face config, and the checkpoint's name for each of our weights.

Per layer: q / k / v are column-parallel by heads (padded with zero heads where tp does not divide
them; key/value heads sharded, replicated or overlapping as the decoders do, parallel_layers/heads.py),
the attention output and the MLP's down projection row-parallel (one all-reduce each), the MLP's up
(and gate) projection column-parallel. Our weight names (`layers.3.attn.q.weight`, ...) are the same
for every family; the family's `names` map them to the checkpoint's.

Two layouts of a batch: padded rows [B, S] with an attention mask (forward), or texts packed end to
end into one row of tokens [T] with their offsets (packed, CPU only): the linear layers compute only
real tokens, and tpserve::packed_attention keeps the texts apart and applies the family's attention
pattern (window, causal, relative bias).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..parallel_layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear, backend, parallel_state
from ..parallel_layers.backend import project
from ..parallel_layers.cpu_layers import FusedLinear
from ..parallel_layers.heads import HeadLayout, head_column_linear, head_parameter, head_row_linear
from ..runtime import native_ops
from .decoder import RMSNorm

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}
MPNET_MAX_DISTANCE = 128  # MPNet's relative positions saturate here (relative_position_bucket)


@dataclass
class EncoderConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int = 0          # 0: num_heads
    head_dim: int = 0              # 0: hidden_size // num_heads
    norm: str = "layer"            # "layer" (LayerNorm) or "rms"
    norm_eps: float = 1e-12
    norm_bias: bool = True
    pre_norm: bool = False         # norm -> sublayer -> residual (ModernBERT, Llama); else sublayer -> residual -> norm
    first_attn_norm: bool = True   # ModernBERT's first layer has none (its embeddings are normed)
    embedding_norm: bool = True
    final_norm: bool = False
    activation: str = "gelu"
    glu: bool = False              # act(gate) * up (GeGLU, SwiGLU), else act(up)
    attention_bias: bool = True    # q / k / v
    o_bias: bool | None = None     # the attention output (None: as attention_bias; Qwen2 has none)
    mlp_bias: bool = True
    qk_norm: bool = False          # Qwen3: RMSNorm over each head of q and k before the rotation
    max_positions: int = 512       # learned absolute positions (0: none)
    position_offset: int = 0       # RoBERTa / MPNet: positions start at padding_idx + 1
    type_vocab_size: int = 0       # token type embeddings (0: none)
    relative_buckets: int = 0      # MPNet's relative position bias (0: none)
    rope: list = field(default_factory=list)        # [(inv_freq, scaling)] per kind of layer; [] no rotation
    layer_rope: list[int] = field(default_factory=list)  # per layer: its index into rope
    windows: list[int] = field(default_factory=list)     # per layer: half-width of a local window, -1 global
    causal: bool = False

    def __post_init__(self) -> None:
        self.num_kv_heads = self.num_kv_heads or self.num_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_heads
        self.windows = self.windows or [-1] * self.num_layers
        self.layer_rope = self.layer_rope or [0] * self.num_layers
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} is not supported (supported: {sorted(ACTIVATIONS)})")


def _norm(c: EncoderConfig, size: int | None = None) -> nn.Module:
    size = size or c.hidden_size
    if c.norm == "rms":
        return RMSNorm(size, c.norm_eps)
    return nn.LayerNorm(size, eps=c.norm_eps, bias=c.norm_bias)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., heads, D] rotated by cos / sin [..., 1, D] (rotate-half, as Hugging Face's families)."""
    if backend.NAME == "cpu":  # one op; it takes [b, L, heads, D] (packed: [T, heads, D])
        if x.dim() == 3:
            return native_ops.rope(x.unsqueeze(0), cos.unsqueeze(0), sin.unsqueeze(0))[0]
        return native_ops.rope(x, cos, sin)
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def relative_buckets(num_buckets: int, max_distance: int = MPNET_MAX_DISTANCE) -> torch.Tensor:
    """MPNet's bucket of each relative position s - t from -max_distance to max_distance (beyond, the
    buckets saturate): its relative_position_bucket, bidirectional, by the same float operations."""
    relative = torch.arange(-max_distance, max_distance + 1)
    n = -relative
    half = num_buckets // 2
    bucket = (n < 0).long() * half
    n = n.abs()
    exact = half // 2
    large = exact + (torch.log(n.float() / exact) / math.log(max_distance / exact) * (half - exact)).long()
    large = torch.minimum(large, torch.full_like(large, half - 1))
    return bucket + torch.where(n < exact, n, large)


class EncoderAttention(nn.Module):
    def __init__(self, c: EncoderConfig, layer: int) -> None:
        super().__init__()
        tp, rank = parallel_state.get_tensor_model_parallel_size(), parallel_state.get_tensor_model_parallel_rank()
        layout = HeadLayout(c.num_heads, c.num_kv_heads, tp, rank)
        hd = self.head_dim = c.head_dim
        self.local_heads, self.local_kv = layout.local_heads, layout.local_kv
        self.q = head_column_linear(c.hidden_size, c.num_heads, layout.first_head, layout.local_heads, hd,
                                    c.attention_bias)
        self.k = head_column_linear(c.hidden_size, c.num_kv_heads, layout.first_kv, layout.local_kv, hd,
                                    c.attention_bias)
        self.v = head_column_linear(c.hidden_size, c.num_kv_heads, layout.first_kv, layout.local_kv, hd,
                                    c.attention_bias)
        self.o = head_row_linear(c.num_heads, layout.first_head, layout.local_heads, hd, c.hidden_size,
                                 c.attention_bias if c.o_bias is None else c.o_bias)
        if c.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(hd, c.norm_eps), RMSNorm(hd, c.norm_eps)
        self.qk_norm, self.rotary = c.qk_norm, bool(c.rope)
        # the window of keys each token sees: [t - left, t + right]; -1 no limit (right 0: causal)
        window = c.windows[layer]
        self.left, self.right = window, (0 if c.causal else window)
        group = layout.local_heads // layout.local_kv
        self.grouped = layout.kv_index == [i // group for i in range(layout.local_heads)]
        self.register_buffer("kv_index", torch.tensor(layout.kv_index), persistent=False)
        self.fused = False

    def fuse(self) -> None:
        """After loading: q, k and v as one projection (one op and one pass over the input)."""
        self.qkv = FusedLinear([self.q, self.k, self.v])
        del self.q, self.k, self.v
        self.fused = True

    def _project(self, x: torch.Tensor, rows: torch.Tensor | None) -> list[torch.Tensor]:
        if self.fused:
            return self.qkv(x, rows)
        return [project(layer, x, rows) for layer in (self.q, self.k, self.v)]

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, attend: torch.Tensor,
                bias: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor:
        """Packed: x [T, H], attend = the texts' offsets [R + 1], bias [heads, 2 M + 1] per relative
        position. Padded: x [B, S, H], attend = the additive mask [B, 1 or heads, S, S] (padding, window,
        relative bias already in it)."""
        lead = x.shape[:-1]
        q, k, v = self._project(x, rows)
        q = q.view(*lead, self.local_heads, self.head_dim)
        k = k.view(*lead, self.local_kv, self.head_dim)
        v = v.view(*lead, self.local_kv, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary:
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if not self.grouped:  # padded or overlapping heads: widen key/value heads to the local query heads
            k, v = k.index_select(-2, self.kv_index), v.index_select(-2, self.kv_index)
        if x.dim() == 2:
            out = native_ops.packed_attention(q, k, v, attend, self.head_dim ** -0.5, self.left, self.right, bias)
        else:
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=attend, enable_gqa=self.grouped).transpose(1, 2)
        return project(self.o, out.reshape(*lead, self.local_heads * self.head_dim), rows)


class EncoderMlp(nn.Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.up = ColumnParallelLinear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias, gather_output=False)
        if c.glu:
            self.gate = ColumnParallelLinear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias, gather_output=False)
        self.down = RowParallelLinear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias, input_is_parallel=True)
        self.act, self.glu, self.fused = ACTIVATIONS[c.activation], c.glu, False

    def fuse(self) -> None:
        """After loading: gate and up as one projection."""
        if self.glu:
            self.gate_up = FusedLinear([self.gate, self.up])
            del self.gate, self.up
            self.fused = True

    def forward(self, x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        if not self.glu:
            return project(self.down, self.act(project(self.up, x, rows)), rows)
        gate, up = self.gate_up(x, rows) if self.fused else (project(self.gate, x, rows), project(self.up, x, rows))
        return project(self.down, self.act(gate) * up, rows)


class EncoderLayer(nn.Module):
    def __init__(self, c: EncoderConfig, layer: int) -> None:
        super().__init__()
        self.attn = EncoderAttention(c, layer)
        self.mlp = EncoderMlp(c)
        self.attn_norm = _norm(c) if c.first_attn_norm or layer > 0 or not c.pre_norm else nn.Identity()
        self.mlp_norm = _norm(c)
        self.pre_norm = c.pre_norm
        self.rope = c.layer_rope[layer]

    def forward(self, x, cos, sin, attend, bias, rows):
        if self.pre_norm:
            x = x + self.attn(self.attn_norm(x), cos, sin, attend, bias, rows)
            return x + self.mlp(self.mlp_norm(x), rows)
        x = self.attn_norm(x + self.attn(x, cos, sin, attend, bias, rows))
        return self.mlp_norm(x + self.mlp(x, rows))


class Encoder(nn.Module):
    """This rank's shard of an encoder: forward(input_ids, attention_mask[, token_type_ids]) ->
    last_hidden_state [B, S, H]; packed(...) -> [T, H]."""

    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.config = c
        self.embeddings = nn.Module()
        self.embeddings.word = ParallelEmbedding(c.vocab_size, c.hidden_size)
        if c.max_positions:
            self.embeddings.position = nn.Embedding(c.max_positions, c.hidden_size)
        if c.type_vocab_size:
            self.embeddings.token_type = nn.Embedding(c.type_vocab_size, c.hidden_size)
        if c.embedding_norm:
            self.embeddings.norm = _norm(c)
        self.layers = nn.ModuleList(EncoderLayer(c, i) for i in range(c.num_layers))
        if c.final_norm:
            self.final_norm = _norm(c)
        if c.relative_buckets:
            tp = parallel_state.get_tensor_model_parallel_size()
            layout = HeadLayout(c.num_heads, c.num_heads, tp, parallel_state.get_tensor_model_parallel_rank())
            self.relative_bias = nn.Module()  # [buckets, this rank's heads]
            self.relative_bias.weight = head_parameter((c.relative_buckets, c.num_heads), 1, c.num_heads,
                                                       layout.first_head, layout.local_heads)
            self.register_buffer("relative_bucket", relative_buckets(c.relative_buckets), persistent=False)
        for kind, (inv_freq, scaling) in enumerate(c.rope):
            self.register_buffer(f"inv_freq_{kind}", inv_freq.float().clone(), persistent=False)
            setattr(self, f"rope_scaling_{kind}", float(scaling))

    def fuse(self) -> None:
        """After loading (tpserve's CPU layers): fused q / k / v and gate / up projections."""
        for layer in self.layers:
            layer.attn.fuse()
            layer.mlp.fuse()

    def _embed(self, input_ids: torch.Tensor, positions: torch.Tensor, token_types: torch.Tensor) -> torch.Tensor:
        x = self.embeddings.word(input_ids)
        if self.config.max_positions:
            x = x + self.embeddings.position(positions + self.config.position_offset)
        if self.config.type_vocab_size:
            x = x + self.embeddings.token_type(token_types)
        return self.embeddings.norm(x) if self.config.embedding_norm else x

    def _rotations(self, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(cos, sin) [..., 1, D] per kind of layer, as Hugging Face's rotary embeddings compute them."""
        out = []
        for kind in range(len(self.config.rope)):
            freqs = positions.unsqueeze(-1).float() * getattr(self, f"inv_freq_{kind}")
            angles = torch.cat((freqs, freqs), dim=-1)
            scaling = getattr(self, f"rope_scaling_{kind}")
            out.append(((angles.cos() * scaling).unsqueeze(-2), (angles.sin() * scaling).unsqueeze(-2)))
        return out

    def _bias_table(self) -> torch.Tensor | None:
        """MPNet: this rank's heads' bias per relative position -128 .. 128: [heads, 257]."""
        if not self.config.relative_buckets:
            return None
        return self.relative_bias.weight.index_select(0, self.relative_bucket).t().contiguous()

    def _layers(self, x, positions, attend_of, bias, rows) -> torch.Tensor:
        rotations = self._rotations(positions)
        for layer in self.layers:
            cos, sin = rotations[layer.rope] if rotations else (None, None)
            x = layer(x, cos, sin, attend_of(layer), bias, rows)
        return self.final_norm(x) if self.config.final_norm else x

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        # positions 0, 1, ... (not torch.arange(..., device=...): tracing would bake the device in)
        positions = torch.ones_like(input_ids).cumsum(dim=1) - 1
        x = self._embed(input_ids, positions, token_type_ids)
        s = input_ids.size(1)
        distance = positions[:1].unsqueeze(1) - positions[:1].unsqueeze(2)  # [1, query t, key s]: s - t
        keep = attention_mask[:, None, None, :].bool()  # [B, 1, 1, S]
        table = self._bias_table()
        masks = {}
        for left, right in {(layer.attn.left, layer.attn.right) for layer in self.layers}:
            allowed = keep
            if left >= 0:
                allowed = allowed & (distance >= -left).unsqueeze(1)
            if right >= 0:
                allowed = allowed & (distance <= right).unsqueeze(1)
            mask = torch.zeros_like(allowed, dtype=x.dtype).masked_fill(~allowed, torch.finfo(x.dtype).min)
            if table is not None:  # + bias[h, s - t]: [1, heads, S, S]
                index = distance[0].clamp(-MPNET_MAX_DISTANCE, MPNET_MAX_DISTANCE) + MPNET_MAX_DISTANCE
                mask = mask + table.index_select(1, index.reshape(-1)).view(1, -1, s, s)
            masks[left, right] = mask
        return self._layers(x, positions, lambda layer: masks[layer.attn.left, layer.attn.right], None, None)

    def packed(self, input_ids: torch.Tensor, positions: torch.Tensor, token_types: torch.Tensor,
               offsets: torch.Tensor) -> torch.Tensor:
        """Texts packed end to end: input_ids, positions, token_types [T] (each text's own positions
        0, 1, ...), offsets [R + 1] (text r is tokens offsets[r] .. offsets[r + 1] - 1; tokens past
        offsets[R] are padding) -> last_hidden_state [T, H], each text's tokens as if it ran alone."""
        x = self._embed(input_ids, positions, token_types)
        return self._layers(x, positions, lambda layer: offsets, self._bias_table(), offsets[-1:])


def quantize(encoder: Encoder) -> None:
    """Every linear layer of the encoder to int8 weights in groups of 32 (cpu_layers.quantize); the
    embeddings and norms stay fp32. Inputs, as the kernel rounds them per group: 16 bits for the norm
    outputs (q / k / v, where attention amplifies an error, and the MLP's input, whose channels run up
    to 16x their median), 8 bits for the attention output's and the MLP output's projections, half the
    integer work. Measured on all-MiniLM-L6-v2 against sentence-transformers (cosine, lowest of 96
    texts): every input at 8 bits 0.992, q / k / v alone at 8 bits 0.993, the MLP input alone 0.9987,
    this choice 0.9995; every input at 16 bits 0.9998 but no faster than fp32 on a batch of mixed texts."""
    for layer in encoder.layers:
        attn, mlp = layer.attn, layer.mlp
        inputs = [attn.qkv] if attn.fused else [attn.q, attn.k, attn.v]
        inputs += [mlp.gate_up] if mlp.fused else [mlp.up, *([mlp.gate] if mlp.glu else [])]
        for linear, input_bits in [*((p, 16) for p in inputs), (attn.o, 8), (mlp.down, 8)]:
            linear.quantize(8, input_bits)


def to_bfloat16(encoder: Encoder) -> None:
    """Every linear layer's weights in bfloat16 (cpu_layers.to_bfloat16): one bfloat16 GEMM each; the
    embeddings, norms, attention and pooling stay fp32."""
    for module in encoder.layers.modules():
        if hasattr(module, "to_bfloat16"):  # tpserve's linear layers, fused or not
            module.to_bfloat16()
