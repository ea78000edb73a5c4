"""tpserve tracer: neuronx_distributed's tensor-parallel inference API, real on CPU.

Import paths are the contract: code written for neuronx_distributed ports by changing imports.
The names load on first use (PEP 562), so `python -m tracer --help` and `tracer.errors` need no torch.
"""

import importlib

_EXPORTS = {
    "BucketModelConfig": ".bucketing",
    "sequence_length_bucket_kernel": ".bucketing",
    "TensorParallelModel": ".runtime.tensor_parallel_model",
    "parallel_model_load": ".trace",
    "parallel_model_save": ".trace",
    "parallel_model_trace": ".trace",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tracer' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
