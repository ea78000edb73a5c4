"""`tracer.parallel_layers.layers`, as NxD code imports it (`from ... .parallel_layers.layers import
ColumnParallelLinear`): this module IS the backend's (the import is redirected to it), so the names
are neuronx_distributed's own on a Neuron host and tpserve's CPU layers (cpu_layers.py) elsewhere."""

import importlib
import sys

from .. import neuron

sys.modules[__name__] = (neuron.module("parallel_layers.layers") if neuron.available()
                         else importlib.import_module(".cpu_layers", __package__))
