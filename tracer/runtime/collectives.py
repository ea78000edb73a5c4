"""Wraps the C++ collective ops (csrc/collectives.cpp, built and loaded by native_ops) and their controls.

The ops take no group: each thread binds its group and rank (bind / bind_process_group) before it
runs a graph, so the same saved graph runs on rank threads or on torch.distributed processes.
"""

from __future__ import annotations

import torch

from .native_ops import ops


def all_reduce(x: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    return ops().all_reduce(x, rank, world_size)


def all_gather(x: torch.Tensor, dim: int, rank: int, world_size: int) -> torch.Tensor:
    return ops().all_gather(x, dim, rank, world_size)


def bind_trace() -> None:
    """Collectives on this thread return right-shaped tensors without talking to other ranks."""
    ops()._bind_trace()


def create_group(name: str, world_size: int) -> None:
    ops()._create_group(name, world_size)


def destroy_group(name: str) -> None:
    ops()._destroy_group(name)


def bind(name: str, rank: int) -> None:
    """This thread is `rank` of the rank-thread group `name`."""
    ops()._bind(name, rank)


def bind_process_group(group_name: str) -> None:
    """This thread's collectives run c10d's functional collectives on that torch.distributed group."""
    ops()._bind_process_group(group_name)


def unbind() -> None:
    ops()._unbind()


def abort(name: str) -> None:
    """Release every rank waiting in a collective of `name` (one rank failed)."""
    ops()._abort(name)


def reset(name: str) -> None:
    ops()._reset(name)


def set_timeout(name: str, ms: int) -> None:
    ops()._set_timeout(name, ms)


def take_collective_ns() -> int:
    """Nanoseconds this thread spent in collectives since the last call (benchmark)."""
    return ops()._take_collective_ns()
