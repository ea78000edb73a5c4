"""Builds and loads the C++ collective ops (csrc/collectives.cpp) and wraps their controls.

The library is compiled with the machine's g++ against the installed torch when a rank runtime or a
trace worker first needs it (not on import: `python -m tracer --help`, the archive step and the
handler's error types never pay for it), and cached (keyed by source, torch and Python version) in
$TPSERVE_CACHE_DIR or ~/.cache/tpserve. It must be loaded before any traced graph is (RankShard).

The ops take no group: each thread binds its group and rank (bind / bind_process_group) before it
runs a graph, so the same saved graph runs on rank threads or on torch.distributed processes.
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

from ..cache_dir import cache_dir

SOURCE = Path(__file__).parent / "csrc" / "collectives.cpp"


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
    cache = cache_dir()
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


def ops():
    """torch.ops.tpserve, with the library built and loaded on first use."""
    if not hasattr(torch.ops.tpserve, "all_reduce"):
        torch.ops.load_library(str(library_path()))
    return torch.ops.tpserve



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
