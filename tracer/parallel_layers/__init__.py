"""Tensor-parallel building blocks: parallel_state, the layers, and load (neuronx_distributed's names).

On a Neuron host parallel_state and the layers are neuronx_distributed's own (backend.py)."""

from . import layers
from .backend import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear, parallel_state, project
from .checkpoint import load

__all__ = ["ColumnParallelLinear", "ParallelEmbedding", "RowParallelLinear", "layers", "load", "parallel_state",
           "project"]
