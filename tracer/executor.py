"""Rank threads: one thread per tensor-parallel rank, all in this process.

Traced graphs release the GIL, so the ranks run truly in parallel; their collectives meet in the
C++ spin barrier of tracer/csrc/collectives.cpp. Each thread owns a share of the intra-op threads.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable
from typing import Any

import torch

from . import collectives
from .errors import RankExecutionError

_group_ids = itertools.count()


class RankThreads:
    def __init__(self, tp_degree: int, threads_per_rank: int, collective_timeout_s: float = 120.0) -> None:
        self.tp_degree = tp_degree
        self.threads_per_rank = threads_per_rank
        self.group = f"tpserve-{id(self):x}-{next(_group_ids)}"
        collectives.create_group(self.group, tp_degree)
        collectives.set_timeout(self.group, int(collective_timeout_s * 1000))
        self._jobs: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in range(tp_degree)]
        self._results: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._serve, args=(rank,), name=f"tpserve-rank-{rank}", daemon=True)
                         for rank in range(tp_degree)]
        for thread in self._threads:
            thread.start()

    def _serve(self, rank: int) -> None:
        torch.set_num_threads(self.threads_per_rank)  # per-thread setting: this rank's share
        collectives.bind(self.group, rank)
        while (job := self._jobs[rank].get()) is not None:
            try:
                with torch.inference_mode():
                    result = (True, job(rank))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, never lost
                collectives.abort(self.group)  # release peers waiting in a collective
                result = (False, exc)
            self._results.put((rank, result))
        collectives.unbind()

    def run(self, job: Callable[[int], Any]) -> list[Any]:
        """Run job(rank) on every rank thread; returns the per-rank results. Not reentrant:
        the caller serialises calls."""
        for rank in range(self.tp_degree):
            self._jobs[rank].put(job)
        results: list[Any] = [None] * self.tp_degree
        failures: list[tuple[int, BaseException]] = []
        for _ in range(self.tp_degree):
            rank, (ok, value) = self._results.get()
            if ok:
                results[rank] = value
            else:
                failures.append((rank, value))
        if failures:
            collectives.reset(self.group)  # every rank has returned: safe to clear the barrier
            rank, exc = min(failures, key=lambda f: "aborted" in str(f[1]))  # the root cause first
            message = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
            raise RankExecutionError(f"rank {rank} failed: {message}") from exc
        return results

    def close(self) -> None:
        for q in self._jobs:
            q.put(None)
        for thread in self._threads:
            thread.join()
        collectives.destroy_group(self.group)
