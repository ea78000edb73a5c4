"""Rank threads: one thread per tensor-parallel rank, all in this process.

Traced graphs release the GIL, so the ranks run truly in parallel; their collectives meet in the
C++ spin barrier of csrc/collectives.cpp. Each rank gets a share of the intra-op threads.
Rank 0 runs on the calling thread: OpenMP's worker pool belongs to the thread that uses it, and
the caller's pool is already warm (measured: tp=1 MiniLM 14 ms on the caller, 22 ms on a new thread).
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..artifacts import Manifest
from ..errors import RankExecutionError, last_line
from . import collectives
from .failures import root_cause
from .rank_shard import RankShard

_group_ids = itertools.count()


class RankThreads:
    def __init__(self, load_dir: Path, manifest: Manifest, threads_per_rank: int | None = None,
                 collective_timeout_s: float = 30.0) -> None:
        self.tp_degree = tp_degree = manifest.tp_degree
        self.threads_per_rank = threads_per_rank or max(1, torch.get_num_threads() // tp_degree)
        self.shards = [RankShard(Path(load_dir), manifest, rank) for rank in range(tp_degree)]
        self.group = f"tpserve-{id(self):x}-{next(_group_ids)}"
        collectives.create_group(self.group, tp_degree)
        collectives.set_timeout(self.group, int(collective_timeout_s * 1000))
        self._jobs: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in range(tp_degree)]
        self._results: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._serve, args=(rank,), name=f"tpserve-rank-{rank}", daemon=True)
                         for rank in range(1, tp_degree)]
        for thread in self._threads:
            thread.start()

    def _run_rank(self, rank: int, job: Callable[[int], Any]) -> tuple[bool, Any]:
        try:
            with torch.inference_mode():
                return True, job(rank)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, never lost
            collectives.abort(self.group)  # release peers waiting in a collective
            return False, exc

    def _serve(self, rank: int) -> None:
        torch.set_num_threads(self.threads_per_rank)  # per-thread setting: this rank's share
        collectives.bind(self.group, rank)
        while (job := self._jobs[rank].get()) is not None:
            self._results.put((rank, self._run_rank(rank, job)))
        collectives.unbind()

    def run(self, job: Callable[[int], Any]) -> list[Any]:
        """Run job(rank) on every rank; returns the per-rank results. Not reentrant: the caller
        serialises calls."""
        for rank in range(1, self.tp_degree):
            self._jobs[rank].put(job)
        caller_threads = torch.get_num_threads()
        if caller_threads != self.threads_per_rank:
            torch.set_num_threads(self.threads_per_rank)
        collectives.bind(self.group, 0)
        try:
            outcomes = {0: self._run_rank(0, job)}
        finally:
            collectives.unbind()
            if caller_threads != self.threads_per_rank:
                torch.set_num_threads(caller_threads)
        for _ in range(1, self.tp_degree):
            rank, outcome = self._results.get()
            outcomes[rank] = outcome
        failures = [(rank, value) for rank, (ok, value) in sorted(outcomes.items()) if not ok]
        if failures:
            collectives.reset(self.group)  # every rank has returned: safe to clear the barrier
            rank, message = root_cause([(rank, last_line(exc)) for rank, exc in failures])
            raise RankExecutionError(f"rank {rank} failed: {message}") from dict(failures)[rank]
        return [outcomes[rank][1] for rank in range(self.tp_degree)]

    def run_bucket(self, bucket: int, inputs: list[torch.Tensor], keep_states: bool = True) -> Any:
        return self.run(lambda rank: self.shards[rank].run(bucket, inputs, keep_states))[0]

    def local_graphs(self, rank: int) -> list[torch.jit.ScriptModule]:
        return list(self.shards[rank].graphs)

    def close(self) -> None:
        if self._threads is None:
            return
        for rank in range(1, self.tp_degree):
            self._jobs[rank].put(None)
        for thread in self._threads:
            thread.join()
        self._threads = None
        collectives.destroy_group(self.group)
