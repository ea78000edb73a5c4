"""`tracer.parallel_layers.parallel_state`, as NxD code imports it: this module IS the backend's (the
import is redirected to it): neuronx_distributed's on a Neuron host, tpserve's (cpu_parallel_state.py)
elsewhere, so the rank a model reads is the one its layers shard by."""

import importlib
import sys

from .. import neuron

sys.modules[__name__] = (neuron.module("parallel_layers.parallel_state") if neuron.available()
                         else importlib.import_module(".cpu_parallel_state", __package__))
