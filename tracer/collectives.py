"""Builds and loads the C++ collective ops (tracer/csrc/collectives.cpp) and wraps their controls.

The library is compiled with the machine's g++ against the installed torch on first import and
cached (keyed by source and torch version) in $TPSERVE_CACHE_DIR or ~/.cache/tpserve, so a fresh
machine needs nothing but `make test`. The .so must be loaded before any traced graph is.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch
from torch.utils import cpp_extension

SOURCE = Path(__file__).parent / "csrc" / "collectives.cpp"
LOGICAL_GROUP = "tp"  # the group name recorded in traced graphs; executors bind the real one


def _cache_dir() -> Path:
    default = Path.home() / ".cache" / "tpserve"
    return Path(os.environ.get("TPSERVE_CACHE_DIR", default))


def _compile_command(output: Path) -> list[str]:
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    includes.append(f"-I{sysconfig.get_paths()['include']}")
    libdirs = [f"-L{p}" for p in cpp_extension.library_paths()]
    rpaths = [f"-Wl,-rpath,{p}" for p in cpp_extension.library_paths()]
    return [
        os.environ.get("CXX", "g++"), "-O2", "-std=c++17", "-shared", "-fPIC",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *includes, str(SOURCE), "-o", str(output),
        *libdirs, *rpaths, "-lc10", "-ltorch_cpu", "-ltorch",
    ]


def library_path() -> Path:
    """Path of the compiled library, building it if this source/torch pair has none yet."""
    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + sys.version.encode())
    cache = _cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    output = cache / f"tpserve_collectives_{key.hexdigest()[:16]}.so"
    if output.exists():
        return output
    with open(cache / "build.lock", "w") as lock:  # one builder at a time (spawned trace workers)
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not output.exists():
            partial = output.with_suffix(f".{os.getpid()}.tmp")
            result = subprocess.run(_compile_command(partial), capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"building {SOURCE.name} failed:\n{result.stderr[-4000:]}")
            partial.rename(output)
    return output


def load_library() -> None:
    if not hasattr(torch.ops.tpserve, "all_reduce"):
        torch.ops.load_library(str(library_path()))


load_library()
_ops = torch.ops.tpserve


def all_reduce(x: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    return _ops.all_reduce(x, LOGICAL_GROUP, rank, world_size)


def all_gather(x: torch.Tensor, dim: int, rank: int, world_size: int) -> torch.Tensor:
    return _ops.all_gather(x, dim, LOGICAL_GROUP, rank, world_size)


def bind_trace() -> None:
    """Collectives on this thread return right-shaped tensors without talking to other ranks."""
    _ops._bind_trace()


create_group = _ops._create_group
destroy_group = _ops._destroy_group
bind = _ops._bind
bind_process_group = _ops._bind_process_group  # c10d group name: collectives run on torch.distributed
unbind = _ops._unbind
abort = _ops._abort
reset = _ops._reset
set_timeout = _ops._set_timeout
take_collective_ns = _ops._take_collective_ns
