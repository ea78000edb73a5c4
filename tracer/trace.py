"""parallel_model_trace / parallel_model_save / parallel_model_load (neuronx_distributed's API).

parallel_model_load lives with the runtime (tracer/runtime/tensor_parallel_model.py): loading needs
nothing of the build side."""

from __future__ import annotations

import os
import pickle
import shlex
import shutil
import tempfile
import weakref
from pathlib import Path

import torch

from . import artifacts, neuron
from .bucketing import BucketModelConfig
from .builder.trace_workers import run_trace_workers
from .errors import CompilerArgsError, TraceError
from .runtime.tensor_parallel_model import TensorParallelModel, parallel_model_load  # noqa: F401 - public API

# compiler_args the CPU backend understands; anything else is refused, never silently ignored.
_CPU_COMPILER_FLAGS = {
    "--check-trace": ("check_trace", True),   # re-run each traced graph and compare with eager
    "--no-strict": ("strict", False),         # allow list/dict outputs (torch.jit.trace strict=False)
}


def _parse_compiler_args(compiler_args) -> dict:
    options = {"check_trace": False, "strict": True}
    if compiler_args is None:
        return options
    args = shlex.split(compiler_args) if isinstance(compiler_args, str) else list(compiler_args)
    unknown = [a for a in args if a not in _CPU_COMPILER_FLAGS]
    if unknown:
        raise CompilerArgsError(f"compiler_args {unknown} are not known to the CPU backend "
                                f"(known: {sorted(_CPU_COMPILER_FLAGS)})")
    for arg in args:
        key, value = _CPU_COMPILER_FLAGS[arg]
        options[key] = value
    return options


def _as_tuple(example) -> tuple:
    return tuple(example) if isinstance(example, (tuple, list)) else (example,)


def _signature(example: tuple) -> list[dict]:
    if not all(isinstance(x, torch.Tensor) for x in example):
        raise TypeError("example_inputs must be tensors (or a tuple of tensors)")
    return [{"shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")} for x in example]


def parallel_model_trace(func, example_inputs, compiler_workdir=None, compiler_args=None,
                         inline_weights_to_neff=True, bucket_config: BucketModelConfig | None = None,
                         tp_degree=1, max_parallel_compilations=None) -> TensorParallelModel:
    """Trace `func()`'s model on every rank (one spawned worker per rank, at most
    `max_parallel_compilations` at once) and return the ranks as one TensorParallelModel."""
    if neuron.available():
        return neuron.module("trace").parallel_model_trace(
            func, example_inputs, compiler_workdir=compiler_workdir, compiler_args=compiler_args,
            inline_weights_to_neff=inline_weights_to_neff, bucket_config=bucket_config, tp_degree=tp_degree,
            max_parallel_compilations=max_parallel_compilations)
    if not isinstance(tp_degree, int) or tp_degree < 1:
        raise ValueError(f"tp_degree must be an int >= 1, got {tp_degree!r}")
    if max_parallel_compilations is None:
        max_parallel_compilations = tp_degree
    if not isinstance(max_parallel_compilations, int) or max_parallel_compilations < 1:
        raise ValueError(f"max_parallel_compilations must be an int >= 1, got {max_parallel_compilations!r}")
    options = _parse_compiler_args(compiler_args)
    if bucket_config is not None:
        if inline_weights_to_neff:
            raise ValueError("bucket_config requires inline_weights_to_neff=False (as in neuronx_distributed)")
        if not isinstance(example_inputs, list) or not example_inputs:
            raise ValueError("with bucket_config, example_inputs must be a list with one input per bucket")
        examples = [_as_tuple(e) for e in example_inputs]
        func_kwargs = bucket_config.func_kwargs or [{} for _ in examples]
        if len(func_kwargs) != len(examples):
            raise ValueError(f"func_kwargs has {len(func_kwargs)} entries for {len(examples)} buckets")
    else:
        examples, func_kwargs = [_as_tuple(example_inputs)], [{}]
    signatures = [{"index": i, "inputs": _signature(e)} for i, e in enumerate(examples)]
    try:
        pickle.dumps(func)
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        raise TraceError(f"func must be a module-level function so that trace workers can import it ({exc})") from exc

    temporary = compiler_workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="tpserve-trace-") if temporary else compiler_workdir)
    out_dir = workdir / "artifacts"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    workers = min(max_parallel_compilations, tp_degree)
    intra_op = max(1, (os.cpu_count() or 1) // workers)
    worker_args = [(func, rank, tp_degree, examples, func_kwargs, inline_weights_to_neff, options, str(out_dir),
                    intra_op) for rank in range(tp_degree)]
    results = run_trace_workers(worker_args, workers)
    results.sort(key=lambda r: r["rank"])
    files = {name: digest for r in results for name, digest in r["files"].items()}
    kernel = None
    if bucket_config is not None:
        kernel = artifacts.BUCKET_KERNEL
        bucket_config.scripted_kernel().save(str(out_dir / kernel))
        files[kernel] = artifacts.sha256(out_dir / kernel)
    manifest = artifacts.Manifest(
        tp_degree=tp_degree, inline_weights=bool(inline_weights_to_neff), buckets=signatures,
        aliases=results[0]["aliases"], files=files, bucket_kernel=kernel,
        runtime_states=results[0]["runtime_states"], ties=results[0]["ties"],
        trace_timing=[{k: v for k, v in r.items() if k not in ("files", "aliases", "runtime_states", "ties")}
                      for r in results])
    if any(r["runtime_states"] != manifest.runtime_states for r in results):
        raise TraceError("the ranks' run-time states (e.g. KV caches) differ in shape; every rank must match")
    manifest.write(out_dir)  # last: everything it names is on disk
    model = TensorParallelModel(out_dir, manifest)  # just written and hashed: no need to re-verify
    if temporary:  # the temp dir lives as long as the model (save copies from it)
        weakref.finalize(model, shutil.rmtree, workdir, True)
    return model


def parallel_model_save(model: TensorParallelModel, save_dir) -> None:
    """Write one directory per rank (tp_{rank}/) plus manifest.json into save_dir."""
    if neuron.available() and not isinstance(model, TensorParallelModel):
        return neuron.module("trace").parallel_model_save(model, save_dir)
    if not isinstance(model, TensorParallelModel):
        raise TypeError(f"expected a TensorParallelModel, got {type(model).__name__}")
    source, target = model.load_dir, Path(save_dir)
    if target.resolve() != source.resolve():
        artifacts.copy_artifacts(source, target, model.manifest)
