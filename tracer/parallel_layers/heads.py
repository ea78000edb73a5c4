"""Attention projections split by heads, for any tp degree (as NxD Inference does it).

When tp does not divide the query heads, they are padded up to a multiple of tp with zero heads
(zero q rows, zero o_proj columns: the output is unchanged). Each rank holds a contiguous run of
query heads and the key/value heads those need: sharded when tp divides the KV heads, replicated
when tp exceeds them, overlapping otherwise (SmolLM2: 9 heads, 3 KV heads, tp 2). Every rank holds
the same number of KV heads, so every rank's KV cache has the same shape.
"""

from __future__ import annotations

import torch

from . import backend
from .cpu_layers import _check_shape, copy_slice


class HeadLayout:
    """Which query and KV heads `rank` of `tp` holds, and which local KV head each local query head reads."""

    def __init__(self, num_heads: int, num_kv_heads: int, tp: int, rank: int) -> None:
        if num_heads % num_kv_heads:
            raise ValueError(f"num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.per_kv = num_heads // num_kv_heads
        self.local_heads = -(-num_heads // tp)              # padded up to a multiple of tp
        self.padded_heads = self.local_heads * tp
        needed = [self._kv_range(r) for r in range(tp)]
        self.local_kv = max(hi - lo + 1 for lo, hi in needed)
        lo, _ = needed[rank]
        self.first_head = rank * self.local_heads
        self.first_kv = min(lo, num_kv_heads - self.local_kv)
        # local query head i reads local KV head kv_index[i] (padding heads read head 0: their q is zero)
        self.kv_index = [(h // self.per_kv - self.first_kv) if h < num_heads else 0
                         for h in range(self.first_head, self.first_head + self.local_heads)]

    def _kv_range(self, rank: int) -> tuple[int, int]:
        real = [h for h in range(rank * self.local_heads, (rank + 1) * self.local_heads) if h < self.num_heads]
        if not real:  # a rank of padding heads only
            return 0, 0
        return real[0] // self.per_kv, real[-1] // self.per_kv


def _heads_loader(full_shape: tuple[int, ...], dim: int, first: int, count: int, total: int, head_dim: int):
    """A weight_loader: the param's `count` heads along `dim` <- heads first.. of the checkpoint
    tensor; heads >= total are zero padding."""
    def load(param: torch.Tensor, source) -> None:
        _check_shape("attention heads", source, full_shape)
        param.zero_()
        real = max(0, min(count, total - first))
        if real:
            copy_slice(param.narrow(dim, 0, real * head_dim), source, dim, first * head_dim, real * head_dim)
    return load


def head_column_linear(input_size: int, total: int, first: int, count: int, head_dim: int, bias: bool):
    """q/k/v projection: a column-parallel layer (this backend's) whose rank holds `count` heads from
    `first` (of `total`, zero padded past it). No gather: attention runs on the local heads."""
    tp = backend.parallel_state.get_tensor_model_parallel_size()
    layer = backend.ColumnParallelLinear(input_size, count * head_dim * tp, bias=bias, gather_output=False)
    layer.weight.weight_loader = _heads_loader((total * head_dim, input_size), 0, first, count, total, head_dim)
    if bias:
        layer.bias.weight_loader = _heads_loader((total * head_dim,), 0, first, count, total, head_dim)
    return layer


def head_row_linear(total: int, first: int, count: int, head_dim: int, output_size: int, bias: bool):
    """o_proj: a row-parallel layer (this backend's) whose rank's input columns are its query heads
    (padding heads: zero columns); partial sums all-reduced, the bias added once."""
    tp = backend.parallel_state.get_tensor_model_parallel_size()
    layer = backend.RowParallelLinear(count * head_dim * tp, output_size, bias=bias, input_is_parallel=True)
    layer.weight.weight_loader = _heads_loader((output_size, total * head_dim), 1, first, count, total, head_dim)
    return layer


def head_parameter(full_shape: tuple[int, ...], dim: int, total: int, first: int, count: int) -> torch.nn.Parameter:
    """A per-head parameter that is not a projection (MPNet's relative position bias: [buckets, heads]):
    this rank's `count` heads from `first` along `dim` (zero past `total`)."""
    shape = list(full_shape)
    shape[dim] = count
    param = torch.nn.Parameter(torch.zeros(shape), requires_grad=False)
    param.weight_loader = _heads_loader(tuple(full_shape), dim, first, count, total, 1)
    return param
