"""Tensor-parallel building blocks: parallel_state, layers, and load (neuronx_distributed's names)."""

from . import layers, parallel_state
from .checkpoint import load
from .layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear

__all__ = ["ColumnParallelLinear", "ParallelEmbedding", "RowParallelLinear", "layers", "load", "parallel_state"]
