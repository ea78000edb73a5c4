"""Threads per rank of a TorchServe worker: the cores shared out between workers and ranks."""

from handler import worker_threads


def test_cores_are_shared_out_between_workers_and_ranks(monkeypatch):
    monkeypatch.setattr(worker_threads, "cores", lambda: 8)
    assert worker_threads.threads_per_rank({"minWorkers": 1, "handler": {"tp_degree": 2}}) == 4
    assert worker_threads.threads_per_rank({"minWorkers": 2, "handler": {"tp_degree": 2}}) == 2
    assert worker_threads.threads_per_rank({"minWorkers": 4, "handler": {"tp_degree": 4}}) == 1  # never 0
    assert worker_threads.threads_per_rank({"minWorkers": 2, "handler": {"tp_degree": 1, "threads_per_rank": 3}}) == 3
    assert worker_threads.threads_per_rank({}) == 8
