"""One rank of a group that torchrun (e.g. TorchServe's torchrun mode) started: this process loads
only its own shard and joins the process group torchrun made (RANK, WORLD_SIZE, MASTER_ADDR/PORT
from the environment). Every rank runs every call; the collectives make their outputs agree, and
the caller (TorchServe) answers with rank 0's."""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any

import torch

from ..artifacts import Manifest
from ..errors import RankNotLocalError
from . import collectives
from .rank_shard import RankShard


class TorchrunRank:
    def __init__(self, load_dir: Path, manifest: Manifest, device: str = "cpu",
                 collective_timeout_s: float = 30.0) -> None:
        import torch.distributed as dist

        self.tp_degree = manifest.tp_degree
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise RuntimeError(f"executor='torchrun' needs torchrun's environment; missing {missing}")
        self.rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if world != self.tp_degree:
            raise ValueError(f"torchrun started {world} processes for a model saved with tp_degree={self.tp_degree}")
        self.device = f"cuda:{int(os.environ.get('LOCAL_RANK', self.rank))}" if device == "cuda" else "cpu"
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=self.rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=collective_timeout_s))
        self.group = dist.group.WORLD.group_name
        self.shard = RankShard(Path(load_dir), manifest, self.rank, device=self.device)

    def run_bucket(self, bucket: int, inputs: list[torch.Tensor], keep_states: bool = True) -> Any:
        collectives.bind_process_group(self.group)  # thread-local: bind on the calling thread
        try:
            with torch.inference_mode():
                return self.shard.run(bucket, [x.to(self.device) for x in inputs], keep_states)
        finally:
            collectives.unbind()

    def local_graphs(self, rank: int) -> list[torch.jit.ScriptModule]:
        if rank != self.rank:
            raise RankNotLocalError(f"rank {rank} runs in another torchrun process (this one is rank {self.rank})")
        return list(self.shard.graphs)

    def close(self) -> None:
        pass  # the process group belongs to the process torchrun started
