"""tpserve tracer: neuronx_distributed's tensor-parallel inference API, real on CPU.

Import paths are the contract: code written for neuronx_distributed ports by changing imports, so
after a plain `import tracer` both the exported names (`tracer.parallel_model_trace`) and the
submodules NxD code reaches as attributes (`tracer.trace.parallel_model_trace`,
`tracer.parallel_layers.layers.ColumnParallelLinear`) resolve. Both load on first use (PEP 562), so
`python -m tracer --help` and `tracer.errors` need no torch.
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

# Every submodule of the package (tests/test_trace.py checks the list against the files).
_SUBMODULES = ("artifacts", "bucketing", "builder", "cache_dir", "engine", "errors", "models", "neuron",
               "parallel_layers", "runtime", "safetensors_reader", "trace")

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)  # importing binds it on the package too
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tracer' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))
