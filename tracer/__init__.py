"""tpserve tracer: neuronx_distributed's tensor-parallel inference API, real on CPU.

Import paths are the contract: code written for neuronx_distributed ports by changing imports.
"""

from . import collectives  # noqa: F401 - loads the collective ops before any graph is loaded
from .bucketing import BucketModelConfig, sequence_length_bucket_kernel
from .model import TensorParallelModel
from .trace import parallel_model_load, parallel_model_save, parallel_model_trace

__all__ = ["BucketModelConfig", "TensorParallelModel", "parallel_model_load", "parallel_model_save",
           "parallel_model_trace", "sequence_length_bucket_kernel"]
