"""The one interface every way of running the ranks implements: load (the constructor), run a
bucket, close. TensorParallelModel talks to nothing else.

    threads    every rank a thread of this process (rank_threads.py; the default on one CPU host)
    processes  one process per rank over torch.distributed, gloo or NCCL (rank_processes.py)
    torchrun   this process is one rank of a group torchrun started (torchrun_rank.py)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch

from ..artifacts import Manifest

EXECUTORS = ("threads", "processes", "torchrun")


class Executor(Protocol):
    tp_degree: int

    def run_bucket(self, bucket: int, inputs: list[torch.Tensor], keep_states: bool = True) -> Any:
        """Run every rank's graph of `bucket` on `inputs`; rank 0's output (torchrun: this rank's),
        with None for the outputs that are states unless keep_states."""

    def local_graphs(self, rank: int) -> list[torch.jit.ScriptModule]:
        """The graphs of a rank held in this process (for inspection); RankNotLocalError otherwise."""

    def close(self) -> None:
        """Release the ranks; idempotent."""


def load_executor(kind: str, load_dir: Path, manifest: Manifest, *, device: str = "cpu",
                  threads_per_rank: int | None = None, collective_timeout_s: float = 30.0) -> Executor:
    if kind not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {kind!r}")
    if device != "cpu" and kind == "threads":
        raise ValueError(f"device {device!r} needs executor='processes' or 'torchrun'")
    if kind == "threads":
        from .rank_threads import RankThreads

        return RankThreads(load_dir, manifest, threads_per_rank, collective_timeout_s)
    if kind == "processes":
        from .rank_processes import RankProcesses

        return RankProcesses(load_dir, manifest, device, threads_per_rank, collective_timeout_s)
    from .torchrun_rank import TorchrunRank

    return TorchrunRank(load_dir, manifest, device, collective_timeout_s)

