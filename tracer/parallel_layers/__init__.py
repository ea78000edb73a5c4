"""Tensor-parallel building blocks: parallel_state, the layers, and load (neuronx_distributed's names).

On a Neuron host parallel_state and the layers (`layers` too, as NxD code spells them:
`parallel_layers.layers.ColumnParallelLinear`) are neuronx_distributed's own (backend.py)."""

from .backend import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear, layers, parallel_state, project
from .checkpoint import load

__all__ = ["ColumnParallelLinear", "ParallelEmbedding", "RowParallelLinear", "layers", "load", "parallel_state",
           "project"]
