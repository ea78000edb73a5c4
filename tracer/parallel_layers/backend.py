"""Which tensor-parallel layers the model families build with.

Where neuronx_distributed runs (tracer.neuron.available()), parallel_state and the three layers ARE
neuronx_distributed's: a model built from tracer.parallel_layers then traces with its compiler and
its collectives. Elsewhere they are tpserve's CPU layers (cpu_layers.py: custom-op collectives and
matmul kernels). Chosen once, at import; TPSERVE_BACKEND=cpu forces tpserve's.
"""

from __future__ import annotations

from .. import neuron
from . import layers, parallel_state  # each the backend's module (see layers.py)

NAME = "neuronx_distributed" if neuron.available() else "cpu"
ColumnParallelLinear = layers.ColumnParallelLinear
RowParallelLinear = layers.RowParallelLinear
ParallelEmbedding = layers.ParallelEmbedding

__all__ = ["NAME", "ColumnParallelLinear", "ParallelEmbedding", "RowParallelLinear", "layers", "parallel_state",
           "project"]


def project(layer, x, rows=None):
    """layer(x) over x's first `rows` rows only (a one-element tensor: a bucket's real rows; the
    padding rows' outputs are zeros, not computed), where tpserve's layers run; neuronx_distributed's
    layers take x whole."""
    return layer(x) if rows is None or NAME != "cpu" else layer(x, rows)
