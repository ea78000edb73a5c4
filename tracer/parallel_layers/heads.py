"""Attention projections split by heads, for any tp degree (as NxD Inference does it).

When tp does not divide the query heads, they are padded up to a multiple of tp with zero heads
(zero q rows, zero o_proj columns: the output is unchanged). Each rank holds a contiguous run of
query heads and the key/value heads those need: sharded when tp divides the KV heads, replicated
when tp exceeds them, overlapping otherwise (SmolLM2: 9 heads, 3 KV heads, tp 2). Every rank holds
the same number of KV heads, so every rank's KV cache has the same shape.
"""

from __future__ import annotations

import torch
from torch import nn

from ..runtime import collectives
from .layers import _check_shape, _LinearLayer, copy_slice


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


def _heads_slice(param: torch.Tensor, source, dim: int, first: int, count: int, total: int, head_dim: int) -> None:
    """param's `count` heads along `dim` <- heads first.. of source; heads >= total are zero padding."""
    param.zero_()
    real = max(0, min(count, total - first))
    if real:
        copy_slice(param.narrow(dim, 0, real * head_dim), source, dim, first * head_dim, real * head_dim)


class HeadColumnParallelLinear(_LinearLayer):
    """q/k/v projection: this rank's output rows are `count` heads from `first` (of `total`, zero
    padded past it). No gather: attention runs on the local heads."""

    def __init__(self, input_size: int, total: int, first: int, count: int, head_dim: int, bias: bool) -> None:
        super().__init__()
        self.total, self.first, self.count, self.head_dim = total, first, count, head_dim
        self.weight = self._parameter(count * head_dim, input_size, full_shape=(total * head_dim, input_size),
                                      loader=self._load)
        self.bias = (self._parameter(count * head_dim, full_shape=(total * head_dim,), loader=self._load)
                     if bias else None)
        nn.init.normal_(self.weight, std=0.02)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _load(self, param: nn.Parameter, source) -> None:
        _check_shape(type(self).__name__, source, param.full_shape)
        _heads_slice(param, source, 0, self.first, self.count, self.total, self.head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, self.bias)


class HeadRowParallelLinear(_LinearLayer):
    """o_proj: this rank's input columns are its query heads (padding heads: zero columns); the
    partial sums are all-reduced and the bias added once."""

    def __init__(self, total: int, first: int, count: int, head_dim: int, output_size: int, bias: bool) -> None:
        super().__init__()
        self.total, self.first, self.count, self.head_dim = total, first, count, head_dim
        self.weight = self._parameter(output_size, count * head_dim, full_shape=(output_size, total * head_dim),
                                      loader=self._load)
        self.bias = self._parameter(output_size, full_shape=(output_size,), loader=self._copy_whole) if bias else None
        nn.init.normal_(self.weight, std=0.02)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _load(self, param: nn.Parameter, source) -> None:
        _check_shape(type(self).__name__, source, param.full_shape)
        _heads_slice(param, source, 1, self.first, self.count, self.total, self.head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._matmul(x)
        if self.tp_size > 1:
            y = collectives.all_reduce(y, self.tp_rank, self.tp_size)
        return y + self.bias if self.bias is not None else y
