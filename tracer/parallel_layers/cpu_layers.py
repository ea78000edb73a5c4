"""Tensor-parallel layers with neuronx_distributed's meaning. Each layer owns its weight loader:
given the UNSHARDED checkpoint tensor (or a lazy safetensors slice), it copies this rank's part.

Collectives are tpserve custom ops, so torch.jit.trace records them inside the graph.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointShapeError
from ..runtime import collectives, native_ops
from . import cpu_parallel_state as parallel_state


def shape_of(source) -> tuple[int, ...]:
    """Shape of a checkpoint tensor: a torch tensor or a tensor still on disk (TensorOnDisk)."""
    return tuple(source.shape)


def copy_slice(dest: torch.Tensor, source, dim: int = 0, start: int = 0, length: int | None = None) -> None:
    """dest <- source.narrow(dim, start, length); a tensor on disk is read straight into dest."""
    if isinstance(source, torch.Tensor):
        dest.copy_(source.narrow(dim, start, source.shape[dim] - start if length is None else length))
    else:
        source.read_into(dest, dim, start, length)


def _check_shape(name: str, source, expected: tuple[int, ...]) -> None:
    if shape_of(source) != expected:
        raise CheckpointShapeError(f"{name}: checkpoint shape {shape_of(source)}, expected unsharded {expected}")


def _divide(total: int, parts: int, what: str) -> int:
    if total % parts:
        raise ValueError(f"{what}={total} is not divisible by tensor parallel size {parts}")
    return total // parts


class _ParallelLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tp_size = parallel_state.get_tensor_model_parallel_size()
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()

    def _parameter(self, *shape: int, full_shape: tuple[int, ...], loader) -> nn.Parameter:
        param = nn.Parameter(torch.empty(*shape), requires_grad=False)
        param.full_shape = full_shape
        param.weight_loader = loader
        return param

    def _copy_whole(self, param: nn.Parameter, source) -> None:
        _check_shape(type(self).__name__, source, param.full_shape)
        copy_slice(param, source)


class _LinearLayer(_ParallelLayer):
    """A layer that multiplies by its rank's weight matrix (fp32, bfloat16, or int8 / int4 once quantized)."""

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """x W^T (+ bias) with this rank's weight: fp32, bfloat16 after to_bfloat16(), or int8 / int4
        after quantize(). rows (a tpserve extension of the layers' forward): only x's first `rows` rows
        are real, the rest a bucket's padding, whose outputs come back zero (native_ops.linear)."""
        if hasattr(self, "qweight"):
            op = native_ops.linear_int8 if self.weight_bits == 8 else native_ops.linear_int4
            return op(x, self.qweight, self.scale, self.minimum, bias, rows, self.input_bits)
        if self.weight.dtype == torch.bfloat16:
            return native_ops.linear_bf16(x, self.weight, bias, rows)
        return native_ops.linear(x, self.weight, bias, rows)

    def to_bfloat16(self) -> None:
        """The weight in bfloat16 (the bias stays fp32): inputs are rounded to bfloat16 for one bfloat16
        GEMM, which CPUs with AMX or AVX-512 BF16 run several times faster than fp32 (native_ops.linear_bf16).
        Call after the checkpoint is loaded."""
        self.weight = nn.Parameter(self.weight.detach().to(torch.bfloat16), requires_grad=False)

    def quantize(self, bits: int, input_bits: int = 16, grid: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Weight-only int8 or int4 in groups of 32 input features, each group with a float16 scale and
        minimum (w = scale * q + minimum; q in 0..255 or 0..15: llama.cpp's Q4_1 / Q8_0 blocks), laid
        out as csrc/quantized_blocks.h reads them. Call after the checkpoint is loaded; the fp32 weight
        is dropped. Each rank quantizes its own part: groups lie inside this rank's columns (a shard's
        input features must divide by 32), so shards and their scales split together. Per group the
        grid is the one that holds the group best: from its minimum to its maximum, or (int8) symmetric
        around zero (absmax / 127), which holds a GGUF Q8_0 block exactly where min-max would not.
        input_bits: what the kernel rounds each group of inputs to, 16 (generation) or 8 (the encoder:
        half the integer work on many rows; native_ops.linear_int8). grid: each group's (scale, minimum)
        [rows, features / 32] where the weights came on a grid of their own (a GGUF file's blocks:
        builder/gguf_grids.py): the weights go onto it (as float16 holds it) instead of a grid of ours;
        a group whose scale is 0 (a padding head) takes ours."""
        weight = self.weight.detach()
        rows, features = weight.shape
        if features % 32:
            raise ValueError(f"int{bits} weights need input features per rank divisible by 32, got {features}")
        groups = weight.reshape(rows, features // 32, 32)
        if groups.abs().amax() > 60000:
            raise ValueError(f"int{bits} weights are stored with float16 scales: |weight| must stay below 60000")
        top = 2**bits - 1
        if grid is not None:
            given, start = _half(grid[0]), _half(grid[1])
            given_q = torch.round((groups - start.unsqueeze(-1)) / _nonzero(given).unsqueeze(-1)).clamp(0, top)
        minimum = _half(groups.amin(-1))  # the grid as stored, so that q is rounded against it
        scale = _nonzero(_half((groups.amax(-1) - minimum) / top))  # a constant group: q = 0, w = minimum
        q = torch.round((groups - minimum.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp(0, top)
        if bits == 8:
            step = _nonzero(_half(groups.abs().amax(-1) / 127))
            q_sym = torch.round(groups / step.unsqueeze(-1)).clamp(-127, 127) + 128
            error = (q * scale.unsqueeze(-1) + minimum.unsqueeze(-1) - groups).abs().amax(-1)
            error_sym = ((q_sym - 128) * step.unsqueeze(-1) - groups).abs().amax(-1)
            sym = error_sym < error
            q = torch.where(sym.unsqueeze(-1), q_sym, q)
            scale, minimum = torch.where(sym, step, scale), torch.where(sym, -128 * step, minimum)
        if grid is not None:
            use = given > 0
            q = torch.where(use.unsqueeze(-1), given_q, q)
            scale, minimum = torch.where(use, given, scale), torch.where(use, start, minimum)
        q, scale, minimum = native_ops.quantized_blocks(q.to(torch.uint8).reshape(rows, features), scale.half(),
                                                        minimum.half(), bits)  # the kernels' blocks of 16 rows
        del self.weight
        self.weight_bits = bits
        self.input_bits = input_bits
        self.qweight = nn.Parameter(q, requires_grad=False)
        self.scale = nn.Parameter(scale, requires_grad=False)
        self.minimum = nn.Parameter(minimum, requires_grad=False)


def _half(t: torch.Tensor) -> torch.Tensor:
    """t's values as float16 holds them (still fp32)."""
    return t.half().float()


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale > 0, scale, torch.ones_like(scale))


class FusedLinear(_LinearLayer):
    """Column projections of the same input (q/k/v, gate/up), each already loaded with this rank's
    rows, as one weight matrix: one read of the weights and one op instead of several. Returns
    the projections' outputs, split (split=False: as one tensor, for an op that reads the parts
    where they lie)."""

    def __init__(self, parts: list[_LinearLayer]) -> None:
        super().__init__()
        self.sizes = [part.weight.shape[0] for part in parts]
        grids = [getattr(part, "grid", None) for part in parts]  # a GGUF's grids (LinearLayer.quantize)
        if all(g is not None for g in grids):
            self.grid = tuple(torch.cat([g[i] for g in grids]) for i in range(2))
            self.grid_bits = max(part.grid_bits for part in parts)
        self.weight = nn.Parameter(torch.cat([part.weight.detach() for part in parts]), requires_grad=False)
        biases = [part.bias for part in parts]
        self.bias = None
        if any(b is not None for b in biases):  # a part without bias adds zeros
            self.bias = nn.Parameter(torch.cat([b.detach() if b is not None else torch.zeros(n)
                                                for b, n in zip(biases, self.sizes, strict=True)]), requires_grad=False)

    def forward(self, x: torch.Tensor, rows: torch.Tensor | None = None, split: bool = True):
        y = self._matmul(x, self.bias, rows)
        return list(y.split(self.sizes, dim=-1)) if split else y


class _ParallelLinear(_LinearLayer):
    def reset_parameters(self) -> None:
        """nn.Linear's initialisation (until a checkpoint is loaded)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            nn.init.uniform_(self.bias, -1 / math.sqrt(self.input_size), 1 / math.sqrt(self.input_size))


class ColumnParallelLinear(_ParallelLinear):
    """y = x A^T + b with A split by output features (rows); gather_output all-gathers y."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True, gather_output: bool = True) -> None:
        super().__init__()
        self.input_size, self.output_size, self.gather_output = input_size, output_size, gather_output
        self.local_out = _divide(output_size, self.tp_size, "output_size")
        self.weight = self._parameter(self.local_out, input_size, full_shape=(output_size, input_size),
                                      loader=self._load_rows)
        self.bias = (self._parameter(self.local_out, full_shape=(output_size,), loader=self._load_rows)
                     if bias else None)
        self.reset_parameters()

    def _load_rows(self, param: nn.Parameter, source) -> None:
        _check_shape(type(self).__name__, source, param.full_shape)
        start = self.tp_rank * self.local_out
        copy_slice(param, source, 0, start, self.local_out)

    def forward(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        y = self._matmul(x, self.bias, rows)
        if self.gather_output and self.tp_size > 1:
            y = collectives.all_gather(y, y.dim() - 1, self.tp_rank, self.tp_size)
        return y


class RowParallelLinear(_ParallelLinear):
    """y = x A^T + b with A split by input features (columns); partial sums are all-reduced and the
    bias is added once, after the reduce. input_is_parallel=False takes this rank's slice of x."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True, input_is_parallel: bool = False) -> None:
        super().__init__()
        self.input_size, self.output_size, self.input_is_parallel = input_size, output_size, input_is_parallel
        self.local_in = _divide(input_size, self.tp_size, "input_size")
        self.weight = self._parameter(output_size, self.local_in, full_shape=(output_size, input_size),
                                      loader=self._load_columns)
        self.bias = (self._parameter(output_size, full_shape=(output_size,), loader=self._copy_whole)
                     if bias else None)
        self.reset_parameters()

    def _load_columns(self, param: nn.Parameter, source) -> None:
        _check_shape(type(self).__name__, source, param.full_shape)
        start = self.tp_rank * self.local_in
        copy_slice(param, source, 1, start, self.local_in)

    def forward(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        if not self.input_is_parallel and self.tp_size > 1:
            start = self.tp_rank * self.local_in
            x = x[..., start:start + self.local_in]
        y = self._matmul(x, rows=rows)
        if self.tp_size > 1:
            y = collectives.all_reduce(y, self.tp_rank, self.tp_size)
        return y + self.bias if self.bias is not None else y


class ParallelEmbedding(_ParallelLayer):
    """Embedding split by vocabulary: each rank owns a contiguous block of rows (the last block is
    zero-padded when the vocabulary does not divide), looks up the ids it owns, zeros the others,
    and the ranks' partial results are all-reduced."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.rows_per_rank = -(-num_embeddings // self.tp_size)
        self.vocab_start = self.tp_rank * self.rows_per_rank
        self.weight = self._parameter(self.rows_per_rank, embedding_dim, full_shape=(num_embeddings, embedding_dim),
                                      loader=self._load_rows)
        nn.init.normal_(self.weight)

    def _load_rows(self, param: nn.Parameter, source) -> None:
        _check_shape(type(self).__name__, source, param.full_shape)
        stop = min(self.vocab_start + self.rows_per_rank, self.num_embeddings)
        param.zero_()
        if stop > self.vocab_start:
            copy_slice(param[: stop - self.vocab_start], source, 0, self.vocab_start, stop - self.vocab_start)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(ids, self.weight, self.padding_idx)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_start + self.rows_per_rank)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return collectives.all_reduce(out, self.tp_rank, self.tp_size)
