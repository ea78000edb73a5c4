"""STAND-IN for neuronx_distributed.parallel_layers.layers: same names, signatures (the arguments
tpserve passes) and parameter sharding; plain math at tp 1, no collectives."""

import torch
import torch.nn.functional as F
from torch import nn

from .parallel_state import get_tensor_model_parallel_rank, get_tensor_model_parallel_size


def _sharded(*shape: int, dim: int) -> nn.Parameter:
    param = nn.Parameter(torch.randn(*shape) * 0.02)
    param.tensor_model_parallel, param.partition_dim, param.partition_stride = True, dim, 1
    return param


def _divide(total: int, parts: int) -> int:
    if total % parts:
        raise ValueError(f"{total} is not divisible by {parts}")
    return total // parts


class _Layer(nn.Module):
    def _tp1(self) -> None:
        if get_tensor_model_parallel_size() > 1:
            raise NotImplementedError("stand-in neuronx_distributed has no collectives: tp > 1 builds only")


class ColumnParallelLinear(_Layer):
    def __init__(self, input_size, output_size, bias=True, gather_output=True, dtype=torch.float32, **_):
        super().__init__()
        local = _divide(output_size, get_tensor_model_parallel_size())
        self.weight = _sharded(local, input_size, dim=0)
        self.bias = _sharded(local, dim=0) if bias else None
        self.gather_output = gather_output

    def forward(self, x):
        self._tp1()
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(_Layer):
    def __init__(self, input_size, output_size, bias=True, input_is_parallel=False, dtype=torch.float32, **_):
        super().__init__()
        self.weight = _sharded(output_size, _divide(input_size, get_tensor_model_parallel_size()), dim=1)
        self.bias = nn.Parameter(torch.zeros(output_size)) if bias else None  # whole on every rank

    def forward(self, x):
        self._tp1()
        return F.linear(x, self.weight, self.bias)


class ParallelEmbedding(_Layer):
    def __init__(self, num_embeddings, embedding_dim, padding_idx=None, dtype=torch.float32, **_):
        super().__init__()
        local = _divide(num_embeddings, get_tensor_model_parallel_size())
        self.start_index = get_tensor_model_parallel_rank() * local
        self.weight = _sharded(local, embedding_dim, dim=0)
        self.padding_idx = padding_idx

    def forward(self, ids):
        self._tp1()
        return F.embedding(ids, self.weight, self.padding_idx)
