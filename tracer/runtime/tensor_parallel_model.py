"""TensorParallelModel: the traced shards of every rank, called like one traced model."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch

from .. import artifacts, neuron
from ..artifacts import Manifest
from ..errors import BucketSelectionError, InputSignatureError, ModelClosedError, last_line
from .executor import load_executor


def _dtype(x: torch.Tensor) -> str:
    """x's dtype as the manifest's bucket signatures name it ("int64", "float32", ...)."""
    return str(x.dtype).removeprefix("torch.")


class TensorParallelModel(torch.nn.Module):
    """Runs all ranks for each call and returns rank 0's output. Safe under concurrent callers
    (calls are serialised: the ranks already use every core). close() or `with` releases the ranks.

    executor="threads" (default): every rank a thread of this process (one host, CPU).
    executor="processes": one process per rank over torch.distributed (gloo on CPU, NCCL on CUDA
    with rank r on cuda:r); each process loads only its own shard.
    executor="torchrun": this process is one rank of a group torchrun started; it loads only its
    own shard and returns its own output (rank 0's is the answer).
    """

    def __init__(self, load_dir: Path, manifest: Manifest, threads_per_rank: int | None = None,
                 executor: str = "threads", device: str = "cpu", collective_timeout_s: float = 30.0) -> None:
        super().__init__()
        self.load_dir = Path(load_dir)
        self.manifest = manifest
        self.tp_degree = manifest.tp_degree
        self.buckets = manifest.buckets
        self.device = device
        self._lock = threading.Lock()
        self._closed = False
        kernel = manifest.bucket_kernel
        self._kernel = torch.jit.load(str(self.load_dir / kernel)) if kernel else None
        self._executor = load_executor(executor, self.load_dir, manifest, device=device,
                                       threads_per_rank=threads_per_rank, collective_timeout_s=collective_timeout_s)

    def rank_modules(self, rank: int) -> list[torch.jit.ScriptModule]:
        """The traced graphs of one rank, one per bucket, if that rank runs in this process (for
        inspection); RankNotLocalError otherwise."""
        return self._executor.local_graphs(rank)

    def select_bucket(self, inputs: list[torch.Tensor]) -> tuple[list[torch.Tensor], int]:
        if self._kernel is None:
            return inputs, 0
        try:
            padded, index = self._kernel(inputs)
        except torch.jit.Error as exc:
            raise BucketSelectionError(last_line(exc).split(": ", 1)[-1]) from exc
        return list(padded), int(index.reshape(-1)[0])

    def _check_inputs(self, inputs: tuple) -> None:
        expected = self.buckets[0]["inputs"]
        if len(inputs) != len(expected):
            raise InputSignatureError(f"expected {len(expected)} inputs, got {len(inputs)}")
        for i, (x, spec) in enumerate(zip(inputs, expected, strict=True)):
            if not isinstance(x, torch.Tensor):
                raise InputSignatureError(f"input {i}: expected a tensor, got {type(x).__name__}")
            if _dtype(x) != spec["dtype"] or x.dim() != len(spec["shape"]):
                raise InputSignatureError(
                    f"input {i}: expected {spec['dtype']} with {len(spec['shape'])} dims, "
                    f"got {_dtype(x)} with {x.dim()} dims")

    def forward(self, *inputs: torch.Tensor) -> Any:
        self._check_inputs(inputs)
        with self._lock:
            if self._closed:
                raise ModelClosedError("this TensorParallelModel is closed")
            padded, bucket = self.select_bucket(list(inputs))
            return self._executor.run_bucket(bucket, padded)

    def run_bucket(self, bucket: int, inputs: list[torch.Tensor]) -> Any:
        """Run bucket `bucket` on inputs already in its shapes, without the bucket kernel (a caller
        that picks and pads for itself: tracer.engine.generator saves the scripted kernel's ~0.15 ms
        a generation step). The outputs that are states come back as None: they stay with the ranks
        (with executor="processes" a call would otherwise send every KV cache back). InputSignatureError
        where a shape or dtype differs from the bucket's."""
        expected = self.buckets[bucket]["inputs"]
        if len(inputs) != len(expected) or any(
                tuple(x.shape) != tuple(spec["shape"]) or _dtype(x) != spec["dtype"]
                for x, spec in zip(inputs, expected, strict=True)):
            raise InputSignatureError(f"bucket {bucket} takes {[(s['dtype'], s['shape']) for s in expected]}, got "
                                      f"{[(_dtype(x), list(x.shape)) for x in inputs]}")
        with self._lock:
            if self._closed:
                raise ModelClosedError("this TensorParallelModel is closed")
            return self._executor.run_bucket(bucket, list(inputs), keep_states=False)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._executor.close()

    def __enter__(self) -> TensorParallelModel:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def extra_repr(self) -> str:
        shapes = [tuple(b["inputs"][0]["shape"]) for b in self.buckets]
        return (f"tp_degree={self.tp_degree}, buckets={len(self.buckets)} {shapes}, "
                f"inline_weights={self.manifest.inline_weights}, backend={self.manifest.backend}, "
                f"executor={type(self._executor).__name__}, device={self.device}, dir='{self.load_dir}'"
                + (", closed" if self._closed else ""))


def parallel_model_load(load_dir, *, tp_degree: int | None = None, threads_per_rank: int | None = None,
                        executor: str = "threads", device: str = "cpu",
                        collective_timeout_s: float = 30.0) -> TensorParallelModel:
    """Load a saved model; verifies the manifest, rank directories and checksums first.

    executor: "threads" (default; ranks as threads of this process) or "processes" (one process per
    rank over torch.distributed: gloo for device="cpu", NCCL for device="cuda" with rank r on cuda:r).
    threads_per_rank defaults to this process's intra-op threads divided by tp_degree. A rank that
    dies or hangs makes the next call raise (RankDiedError / RankTimeoutError) within
    collective_timeout_s."""
    root = Path(load_dir)
    if neuron.available() and not (root / artifacts.MANIFEST).exists():
        return neuron.module("trace").parallel_model_load(str(root))
    manifest = artifacts.read_verified_manifest(root, tp_degree=tp_degree)
    return TensorParallelModel(root, manifest, threads_per_rank=threads_per_rank, executor=executor, device=device,
                               collective_timeout_s=collective_timeout_s)
