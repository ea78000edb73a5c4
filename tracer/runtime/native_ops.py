"""Builds and loads tpserve's C++ ops (csrc/*.cpp: the collectives, the few-row fp32 / int8 / int4 linear,
the bfloat16 one, the decoder's RMS norm, rotary embedding, cached attention and SwiGLU, the encoder's
packed attention) as one library, registered as torch.ops.tpserve.

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
                bias: torch.Tensor | None = None, rows: torch.Tensor | None = None,
                input_bits: int = 16) -> torch.Tensor:
    """x W^T + bias with 8-bit weights in groups of 32 (w = scale * q + minimum, q in 0..255; qweight
    [N, K] uint8, scale and minimum [N, K / 32] float16, laid out by quantized_blocks): integer dot
    products against the inputs rounded to 16 bits per group (|error| <= max|x| of the group / 65024),
    generation steps and prompts alike; input_bits=8: rounded to 8 bits (|error| <= max|x| / 254), half
    the dot products (the encoder's choice). rows: as linear's."""
    return ops().linear_int8(x, qweight, scale, minimum, bias, rows, input_bits)


def linear_int4(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
                bias: torch.Tensor | None = None, rows: torch.Tensor | None = None,
                input_bits: int = 16) -> torch.Tensor:
    """linear_int8 with 4-bit weights (q in 0..15, llama.cpp's Q4_1; qweight [N, K / 2])."""
    return ops().linear_int4(x, qweight, scale, minimum, bias, rows, input_bits)


def linear_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear with bfloat16 weights [N, K]: x rounded to bfloat16, a bfloat16 GEMM (oneDNN: AMX / AVX-512
    BF16 where the CPU has them), the output in x's dtype plus the bias (csrc/linear_bf16.cpp). rows: as
    linear's."""
    return ops().linear_bf16(x, weight, bias, rows)


def quantized_blocks(q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
                     bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """linear_int8 / linear_int4's (qweight, scale, minimum) from q [N, K] (uint8: 0..255, or 0..15
    for bits=4) and each group's scale and minimum [N, K / 32] (float16), laid out as
    csrc/quantized_blocks.h describes: blocks of 16 weight rows (the last may hold fewer); in a block,
    per group of 32 features, 4 features at a time (int4: 8, the second 4 in the high nibbles), each
    row's 4 bytes in turn; the block's scales and minimums group by group."""
    n, k = q.shape
    groups = k // 32
    packed, scales, minimums = [], [], []
    full = n // 16 * 16
    for start, rows, size in ((0, full, 16), (full, n - full, n - full)):
        if rows == 0:
            continue
        b = q[start:start + rows].reshape(rows // size, size, groups, 8, 4)  # block, row, group, quad, j
        if bits == 4:
            b = b[:, :, :, 0::2] | (b[:, :, :, 1::2] << 4)
        packed.append(b.permute(0, 2, 3, 1, 4).reshape(-1))
        for t, parts in ((scale, scales), (minimum, minimums)):
            parts.append(t[start:start + rows].reshape(rows // size, size, groups).transpose(1, 2).reshape(-1))
    return (torch.cat(packed).view(n, k * bits // 8), torch.cat(scales).view(n, groups),
            torch.cat(minimums).view(n, groups))


def quantized_values(qweight: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, bits: int) -> torch.Tensor:
    """The fp32 weights [N, K] that linear_int8 / linear_int4's arguments hold."""
    return ops().quantized_values(qweight, scale, minimum, bits)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x * rsqrt(mean(x^2, -1) + eps)) as one op (csrc/decoder_ops.cpp)."""
    return ops().rms_norm(x, weight, eps)


def cached_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache_k: torch.Tensor,
                     cache_v: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, kv_index: torch.Tensor,
                     context: int, scale: float, window: int = -1, q_norm: torch.Tensor | None = None,
                     k_norm: torch.Tensor | None = None, eps: float = 1e-6, ring: int = 0) -> torch.Tensor:
    """Attention of new tokens over the KV cache, one op: qkv [b, L, (heads + 2 KV heads) * D] (a fused
    q/k/v projection's output) split, each head of q and k RMS-normalized where q_norm / k_norm [D] are
    given, rotated (rope's cos, sin [b, L, 1, R]: the first R of D values), the new keys and values written
    in place into the caches [rows, KV heads, max_context, D] at (slots[i], positions[i, l]), then
    softmax(q k^T * scale) v over the first `context` positions of each row's cache row, causal by
    position (window W > 0: the last W positions only), query head h reading KV head kv_index[h] ->
    [b, L, heads * D]; the caches read where they lie (csrc/decoder_ops.cpp). ring > 0 (a sliding layer):
    the caches hold ring + window - 1 positions, position p at p % ring (mirrored past the ring below
    window - 1), ring >= window + L - 1."""
    return ops().cached_attention(qkv, cos, sin, cache_k, cache_v, slots, positions, kv_index, context, scale, window,
                                  q_norm, k_norm, eps, ring)


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor, scale: float,
                     left: int = -1, right: int = -1, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Self-attention over texts packed end to end: q [tokens, heads, D], k, v [tokens, kv_heads, D]
    (query head h reads kv head h // (heads / kv_heads)); text r is tokens offsets[r] .. offsets[r + 1] - 1
    and attends only to itself; token t to keys s with t - left <= s <= t + right (-1: no limit; right=0
    is causal); bias [heads, 2 M + 1] added per relative position s - t (clamped to +-M); tokens past
    offsets[-1] come back 0 (csrc/encoder_ops.cpp)."""
    return ops().packed_attention(q, k, v, offsets, scale, left, right, bias)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [..., 2 I] (a fused gate / up projection's output) -> [..., I], one op
    (csrc/decoder_ops.cpp)."""
    return ops().swiglu(gate_up)


def geglu(gate_up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) * up for gate_up [..., 2 I] (Gemma's gated MLP) -> [..., I], one op
    (csrc/decoder_ops.cpp)."""
    return ops().geglu(gate_up)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin for x [b, L, heads, D], cos / sin [b, L, 1, R] (R <= D: the first R
    values turn, a partial rotary), as one op (csrc/decoder_ops.cpp)."""
    return ops().rope(x, cos, sin)
