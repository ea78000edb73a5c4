"""TensorParallelModel: the traced shards of every rank, called like one traced model."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from . import artifacts, collectives  # noqa: F401 - the saved graphs call tpserve:: ops
from .errors import BucketSelectionError, InputSignatureError, ModelClosedError

EXECUTORS = ("threads", "processes", "torchrun")


def _resolve(module: torch.jit.ScriptModule, dotted: str) -> tuple[torch.jit.ScriptModule, str]:
    *path, leaf = dotted.split(".")
    for part in path:
        module = getattr(module, part)
    return module, leaf


def get_tensor(module: torch.jit.ScriptModule, dotted: str) -> torch.Tensor:
    owner, leaf = _resolve(module, dotted)
    return getattr(owner, leaf)


def set_tensor(module: torch.jit.ScriptModule, dotted: str, value: torch.Tensor) -> None:
    owner, leaf = _resolve(module, dotted)
    owner._c.setattr(leaf, value)


class RankShard:
    """One rank's traced graphs (one per bucket, sharing one copy of the weights) and its states."""

    def __init__(self, load_dir: Path, manifest: dict, rank: int, device: str = "cpu") -> None:
        buckets = range(len(manifest["buckets"]))
        self.graphs = [torch.jit.load(str(load_dir / artifacts.bucket_file(rank, b)), map_location=device)
                       for b in buckets]
        if not manifest["inline_weights"]:
            shared = load_file(str(load_dir / artifacts.weights_file(rank)), device=device)
        else:  # state tensors must still be one per rank, whichever bucket updates them
            shared = {name: get_tensor(self.graphs[0], name) for name in manifest["aliases"]}
        for graph in self.graphs:
            for name, tensor in shared.items():
                set_tensor(graph, name, tensor)
            graph.eval()
        self.states = [(get_tensor(self.graphs[0], name), index) for name, index in manifest["aliases"].items()]

    def run(self, bucket: int, inputs: list[torch.Tensor]) -> Any:
        output = self.graphs[bucket](*inputs)
        for state, index in self.states:  # input->output aliases: keep the update for the next call
            state.copy_(output[index])
        return output


class TensorParallelModel(torch.nn.Module):
    """Runs all ranks for each call and returns rank 0's output. Safe under concurrent callers
    (calls are serialised: the ranks already use every core). close() or `with` releases the ranks.

    executor="threads" (default): every rank a thread of this process (one host, CPU).
    executor="processes": one process per rank over torch.distributed (gloo on CPU, NCCL on CUDA
    with rank r on cuda:r); each process loads only its own shard.
    executor="torchrun": this process is one rank of a group torchrun started; it loads only its
    own shard and returns its own output (rank 0's is the answer).
    """

    def __init__(self, load_dir: Path, manifest: dict, threads_per_rank: int | None = None,
                 executor: str = "threads", device: str = "cpu", collective_timeout_s: float = 30.0) -> None:
        super().__init__()
        if executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
        if device != "cpu" and executor != "processes":
            raise ValueError(f"device {device!r} needs executor='processes'")
        self.load_dir = Path(load_dir)
        self.manifest = manifest
        self.tp_degree = int(manifest["tp_degree"])
        self.buckets = manifest["buckets"]
        self.device = device
        self._lock = threading.Lock()
        self._closed = False
        kernel = manifest.get("bucket_kernel")
        self._kernel = torch.jit.load(str(self.load_dir / kernel)) if kernel else None
        if executor == "threads":
            from .executor import RankThreads

            if threads_per_rank is None:
                threads_per_rank = max(1, torch.get_num_threads() // self.tp_degree)
            self._ranks = [RankShard(self.load_dir, manifest, rank) for rank in range(self.tp_degree)]
            self._executor = RankThreads(self.tp_degree, threads_per_rank, collective_timeout_s)
        elif executor == "processes":
            from .process_executor import RankProcesses

            self._ranks = []
            self._executor = RankProcesses(self.load_dir, manifest, device, threads_per_rank, collective_timeout_s)
        else:
            from .torchrun_executor import TorchrunRank

            self._ranks = []
            self._executor = TorchrunRank(self.load_dir, manifest, device, collective_timeout_s)

    def rank_modules(self, rank: int) -> list[torch.jit.ScriptModule]:
        """The traced graphs of one rank, one per bucket (rank threads only; for inspection)."""
        return list(self._ranks[rank].graphs)

    def select_bucket(self, inputs: list[torch.Tensor]) -> tuple[list[torch.Tensor], int]:
        if self._kernel is None:
            return inputs, 0
        try:
            padded, index = self._kernel(inputs)
        except torch.jit.Error as exc:
            raise BucketSelectionError(str(exc).strip().splitlines()[-1]) from exc
        return list(padded), int(index.reshape(-1)[0])

    def _check_inputs(self, inputs: tuple) -> None:
        expected = self.buckets[0]["inputs"]
        if len(inputs) != len(expected):
            raise InputSignatureError(f"expected {len(expected)} inputs, got {len(inputs)}")
        for i, (x, spec) in enumerate(zip(inputs, expected, strict=True)):
            if not isinstance(x, torch.Tensor):
                raise InputSignatureError(f"input {i}: expected a tensor, got {type(x).__name__}")
            if str(x.dtype).removeprefix("torch.") != spec["dtype"] or x.dim() != len(spec["shape"]):
                raise InputSignatureError(
                    f"input {i}: expected {spec['dtype']} with {len(spec['shape'])} dims, "
                    f"got {str(x.dtype).removeprefix('torch.')} with {x.dim()} dims")

    def forward(self, *inputs: torch.Tensor) -> Any:
        self._check_inputs(inputs)
        with self._lock:
            if self._closed:
                raise ModelClosedError("this TensorParallelModel is closed")
            padded, bucket = self.select_bucket(list(inputs))
            if self._ranks:
                return self._executor.run(lambda rank: self._ranks[rank].run(bucket, padded))[0]
            return self._executor.run_bucket(bucket, padded)

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
                f"inline_weights={self.manifest['inline_weights']}, backend={self.manifest['backend']}, "
                f"executor={type(self._executor).__name__}, device={self.device}, dir='{self.load_dir}'"
                + (", closed" if self._closed else ""))
