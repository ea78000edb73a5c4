"""Which tensor-parallel layers the model families build with.

Where neuronx_distributed runs (tracer.neuron.available()), parallel_state and the three layers ARE
neuronx_distributed's: a model built from tracer.parallel_layers then traces with its compiler and
its collectives. Elsewhere they are tpserve's CPU layers (layers.py: custom-op collectives and
matmul kernels). Chosen once, at import; TPSERVE_BACKEND=cpu forces tpserve's.
"""

from __future__ import annotations

from .. import neuron

if neuron.available():
    NAME = "neuronx_distributed"
    parallel_state = neuron.module("parallel_layers.parallel_state")
    _layers = neuron.module("parallel_layers.layers")
    ColumnParallelLinear = _layers.ColumnParallelLinear
    RowParallelLinear = _layers.RowParallelLinear
    ParallelEmbedding = _layers.ParallelEmbedding
else:
    NAME = "cpu"
    from . import parallel_state
    from .layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear

__all__ = ["NAME", "ColumnParallelLinear", "ParallelEmbedding", "RowParallelLinear", "parallel_state", "project"]


def project(layer, x, rows=None):
    """layer(x) over x's first `rows` rows only (a one-element tensor: a bucket's real rows; the
    padding rows' outputs are zeros, not computed), where tpserve's layers run; neuronx_distributed's
    layers take x whole."""
    return layer(x) if rows is None or NAME != "cpu" else layer(x, rows)
