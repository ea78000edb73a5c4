"""Builds and loads tpserve's C++ ops (csrc/*.cpp: the collectives, the few-row fp32 / int8 / int4 linear,
the decoder's RMS norm, rotary embedding and cached attention, the encoder's packed attention) as
one library, registered as torch.ops.tpserve.

The library is compiled with the machine's g++ against the installed torch when a rank runtime, a
trace worker or a layer first needs it (not on import: `python -m tracer --help`, the archive step
and the handler's error types never pay for it), and cached (keyed by the sources, torch and Python
version) in $TPSERVE_CACHE_DIR or ~/.cache/tpserve. It must be loaded before any traced graph is
(RankShard). OpenMP: the linear op splits its work with at::parallel_for, which is OpenMP code in
torch's headers; linked through torch's lib directory, the library shares torch's libgomp (one
thread pool, the intra-op threads torch.set_num_threads gives each rank).
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

SOURCES = sorted((Path(__file__).parent / "csrc").glob("*.cpp"))
HEADERS = sorted((Path(__file__).parent / "csrc").glob("*.h"))  # part of the cache key, not compiled alone


def _compile_command(output: Path) -> list[str]:
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    includes.append(f"-I{sysconfig.get_paths()['include']}")
    libdirs = [f"-L{p}" for p in cpp_extension.library_paths()]
    rpaths = [f"-Wl,-rpath,{p}" for p in cpp_extension.library_paths()]
    return [
        os.environ.get("CXX", "g++"), "-O3", "-fopenmp", "-std=c++17", "-shared", "-fPIC",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *includes, *map(str, SOURCES), "-o", str(output),
        *libdirs, *rpaths, "-lc10", "-ltorch_cpu", "-ltorch",
    ]


def library_path() -> Path:
    """Path of the compiled library, building it if these sources and this torch have none yet."""
    key = hashlib.sha256(b"".join(s.read_bytes() for s in SOURCES + HEADERS) + torch.__version__.encode()
                         + sys.version.encode())
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    output = cache / f"tpserve_ops_{key.hexdigest()[:16]}.so"
    if output.exists():
        return output
    with open(cache / "build.lock", "w") as lock:  # one builder at a time (spawned trace workers)
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not output.exists():
            partial = output.with_suffix(f".{os.getpid()}.tmp")
            result = subprocess.run(_compile_command(partial), capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"building tpserve's C++ ops failed:\n{result.stderr[-4000:]}")
            partial.rename(output)
    return output


def ops():
    """torch.ops.tpserve, with the library built and loaded on first use."""
    if not hasattr(torch.ops.tpserve, "all_reduce"):
        torch.ops.load_library(str(library_path()))
    return torch.ops.tpserve


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           rows: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear that reads the weights from memory once when x has at most 64 rows (24 on one
    thread; csrc/linear.cpp). rows (a one-element tensor): only x's first `rows` rows (leading
    dimensions flattened) are real, the rest a bucket's padding: their outputs are zeros, not computed."""
    return ops().linear(x, weight, bias, rows)


def linear_int8(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
                bias: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + bias with 8-bit weights in groups of 32 (w = scale * q + minimum, q in 0..255; qweight
    [N, K] uint8, csrc/linear_quantized.cpp): widened in registers against the fp32 inputs for up to
    8 rows, dequantized tile by tile for the fp32 kernel up to 64, dequantized for a GEMM beyond.
    rows: as linear's."""
    return ops().linear_int8(x, qweight, scale, minimum, bias, rows)


def linear_int4(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
                bias: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + bias with 4-bit weights in groups of 32 (w = scale * q + minimum, llama.cpp's Q4_1;
    qweight [N, K / 2] packed as csrc/linear_quantized.cpp describes): unpacked in registers against
    the fp32 inputs for up to 8 rows, dequantized tile by tile for the fp32 kernel up to 64, dequantized
    for a GEMM beyond. rows: as linear's."""
    return ops().linear_int4(x, qweight, scale, minimum, bias, rows)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x * rsqrt(mean(x^2, -1) + eps)) as one op (csrc/decoder_ops.cpp)."""
    return ops().rms_norm(x, weight, eps)


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                     slots: torch.Tensor, positions: torch.Tensor, kv_index: torch.Tensor, context: int,
                     scale: float) -> torch.Tensor:
    """Writes the new keys and values k, v [b, L, KV heads, D] in place into the caches [rows,
    max_context, KV heads, D] at (slots[i], positions[i, l]), then softmax(q k^T * scale) v over the
    first `context` positions of each row's cache row, causal by position, query head h reading KV
    head kv_index[h]: q [b, L, heads, D] -> [b, L, heads, D]; one op, the caches read where they lie
    (csrc/decoder_ops.cpp)."""
    return ops().cached_attention(q, k, v, cache_k, cache_v, slots, positions, kv_index, context, scale)


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Self-attention over texts packed end to end: q, k, v [tokens, heads, D]; text r is tokens
    offsets[r] .. offsets[r + 1] - 1 and attends only to itself; tokens past offsets[-1] come back 0
    (csrc/encoder_ops.cpp)."""
    return ops().packed_attention(q, k, v, offsets, scale)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin for x [b, L, heads, D], cos / sin [b, L, 1, D], as one op
    (csrc/decoder_ops.cpp)."""
    return ops().rope(x, cos, sin)
