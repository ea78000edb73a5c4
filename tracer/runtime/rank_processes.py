"""Rank processes: one process per tensor-parallel rank over torch.distributed.

For GPUs (NCCL, rank r on cuda:r) and anything beyond one CPU host; on one CPU host rank threads
are faster (rank_threads.py). The saved graphs are the same: each process binds its thread to
the process group, and the graphs' tpserve collectives run c10d's functional collectives.

Rendezvous is a TCPStore that this process owns on a pre-bound 127.0.0.1 socket with a free port
(TCPStore alone listens on every interface). Children die with this process (PR_SET_PDEATHSIG),
even when it is SIGKILLed. A rank that dies, or hangs past the collective timeout, makes the call
raise RankDiedError / RankTimeoutError, and every later call too (load the model again).
"""

from __future__ import annotations

import ctypes
import datetime
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from ..artifacts import Manifest
from ..errors import RankDiedError, RankExecutionError, RankNotLocalError, RankTimeoutError, last_line
from .failures import root_cause

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent dies (Linux), closing the race with an early death."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


def _rank_main(conn, parent_pid: int, rank: int, tp_degree: int, port: int, load_dir: str, manifest: Manifest,
               device: str, threads: int, timeout_s: float) -> None:
    die_with_parent(parent_pid)
    import torch.distributed as dist

    from . import collectives
    from .rank_shard import RankShard

    try:
        torch.set_num_threads(threads)
        timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timeout)
        rank_device = f"cuda:{rank}" if device == "cuda" else "cpu"
        if device == "cuda":
            torch.cuda.set_device(rank)
        dist.init_process_group("nccl" if device == "cuda" else "gloo", store=store, rank=rank,
                                world_size=tp_degree, timeout=timeout)
        shard = RankShard(Path(load_dir), manifest, rank, device=rank_device)
        collectives.bind_process_group(dist.group.WORLD.group_name)
        conn.send(("ready", os.getpid()))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        conn.send(("error", last_line(exc)))
        return
    while (request := conn.recv()) is not None:
        bucket, inputs, keep_states = request
        try:
            with torch.inference_mode():
                output = shard.run(bucket, [x.to(rank_device) for x in _from_wire(inputs)], keep_states)
                if device == "cuda":
                    torch.cuda.synchronize()
            conn.send(("ok", _to_wire(output) if rank == 0 else None))
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            conn.send(("error", last_line(exc)))
    dist.destroy_process_group()


class _Wire(NamedTuple):
    """A tensor sent by value through a pipe. A pickled tensor goes through a new shared-memory
    segment (torch.multiprocessing): measured here, 0.82 ms for a round trip of SmolLM2's logits
    against 0.21 as bytes, and a generation step sends 4 inputs to each rank."""
    dtype: str
    shape: tuple[int, ...]
    data: np.ndarray  # the bytes


def _to_wire(value: Any) -> Any:
    """Tensors (CPU or GPU), and lists / tuples of them or None, as _Wire values."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        return _Wire(str(t.dtype).removeprefix("torch."), tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy())
    return type(value)(_to_wire(v) for v in value)


def _from_wire(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, _Wire):
        return torch.from_numpy(value.data).view(getattr(torch, value.dtype)).reshape(value.shape)
    return type(value)(_from_wire(v) for v in value)


class RankProcesses:
    def __init__(self, load_dir: Path, manifest: Manifest, device: str = "cpu", threads_per_rank: int | None = None,
                 collective_timeout_s: float = 30.0) -> None:
        import torch.distributed as dist

        self.tp_degree = manifest.tp_degree
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        if device == "cuda" and self.tp_degree > torch.cuda.device_count():
            raise ValueError(f"tp_degree={self.tp_degree} needs {self.tp_degree} GPUs; "
                             f"{torch.cuda.device_count()} visible")
        self.timeout_s = collective_timeout_s
        self.threads_per_rank = threads_per_rank or max(1, (os.cpu_count() or 1) // self.tp_degree)
        self._broken: RankExecutionError | None = None
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))  # loopback only, free port
        listener.listen(self.tp_degree)
        self.port = listener.getsockname()[1]
        # The store takes the socket over and closes it itself: detach() so Python never closes the
        # same descriptor number again (it may belong to another file by then).
        self._store = dist.TCPStore("127.0.0.1", self.port, is_master=True, master_listen_fd=listener.detach(),
                                    wait_for_workers=False, timeout=datetime.timedelta(seconds=collective_timeout_s))
        context = multiprocessing.get_context("spawn")
        self._conns, self._processes = [], []
        for rank in range(self.tp_degree):
            receiver, sender = context.Pipe()
            process = context.Process(target=_rank_main, daemon=True, name=f"tpserve-rank-{rank}", args=(
                sender, os.getpid(), rank, self.tp_degree, self.port, str(load_dir), manifest, device,
                self.threads_per_rank, collective_timeout_s))
            process.start()
            sender.close()
            self._conns.append(receiver)
            self._processes.append(process)
        try:
            self._collect(timeout_s=max(120.0, collective_timeout_s), what="start")
        except RankExecutionError:
            self.close()
            raise

    def pids(self) -> list[int]:
        return [p.pid for p in self._processes]

    def _collect(self, timeout_s: float, what: str) -> list[Any]:
        """One reply per rank; a dead or silent rank breaks the executor for good."""
        replies: dict[int, tuple[str, Any]] = {}
        deadline = time.monotonic() + timeout_s
        while len(replies) < self.tp_degree:
            waiting = {self._conns[r]: r for r in range(self.tp_degree) if r not in replies}
            sentinels = {self._processes[r].sentinel: r for r in waiting.values()}
            ready = multiprocessing.connection.wait([*waiting, *sentinels], timeout=deadline - time.monotonic())
            if not ready:
                silent = sorted(waiting.values())
                self._broken = RankTimeoutError(f"ranks {silent} did not answer the {what} within {timeout_s:.0f}s")
                raise self._broken
            dead = set()
            for item in ready:
                if item in waiting:
                    try:
                        replies[waiting[item]] = item.recv()
                    except (EOFError, OSError):  # the other end is gone: the process died
                        dead.add(waiting[item])
                elif sentinels[item] not in replies:
                    dead.add(sentinels[item])
            if dead:
                rank = min(dead)
                self._processes[rank].join(timeout=5)
                self._broken = RankDiedError(f"rank {rank} (pid {self._processes[rank].pid}) exited with code "
                                             f"{self._processes[rank].exitcode} during the {what}")
                raise self._broken
        errors = [(rank, value) for rank, (kind, value) in sorted(replies.items()) if kind == "error"]
        if errors:
            # A failed collective leaves the process group unusable: break for good.
            rank, message = root_cause(errors)
            self._broken = RankExecutionError(f"rank {rank} failed during the {what}: {message}")
            raise self._broken
        return [value for _, (_, value) in sorted(replies.items())]

    def run_bucket(self, bucket: int, inputs: list[torch.Tensor], keep_states: bool = True) -> Any:
        if self._broken is not None:
            raise type(self._broken)(f"{self._broken} (earlier; load the model again)")
        for conn in self._conns:
            try:
                conn.send((bucket, _to_wire(inputs), keep_states))
            except (BrokenPipeError, ConnectionResetError):
                pass  # its death is reported by _collect
        return _from_wire(self._collect(self.timeout_s + 10, what="call")[0])

    def local_graphs(self, rank: int) -> list[torch.jit.ScriptModule]:
        raise RankNotLocalError(f"rank {rank} runs in process {self._processes[rank].pid}, not in this one")

    def close(self) -> None:
        for conn in self._conns:
            try:
                conn.send(None)
            except (BrokenPipeError, ConnectionResetError, OSError):
                pass
        # a broken executor's silent rank will not exit on its own: 1 s, not 10, before it is killed
        grace_s = 1 if self._broken is not None else 10
        for process in self._processes:
            process.join(timeout=grace_s)
            if process.is_alive():
                process.kill()
                process.join()
        self._store = None  # closes the rendezvous socket now, not at some later garbage collection
