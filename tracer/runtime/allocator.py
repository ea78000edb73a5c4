"""Keep the memory a model call frees for the next call.

glibc gives blocks above its mmap threshold (128 KB, raised only as far as blocks already freed)
back to the OS on free(), and trims the heap top above 128 KB, so every model call page-faults its
activations in again: a packed MiniLM call of 384 tokens (2.4 MB per FFN activation) spent more
time in the faults of GELU, bias copies and residual adds than in their arithmetic. Measured, tp 1 x
2 threads, three alternating process pairs: 57-66 ms per call -> 51-58 ms. The price: the process
keeps its peak activation memory (a few tens of MB for a 1024-token call) instead of returning it.
Used by the embedder (its process: the rank threads); a decoder's generation steps, whose
activations are small, measured no gain (SmolLM2 int4 steps, seven alternating pairs: within noise,
if anything ~3 % slower), so they keep glibc's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
_done = False


def keep_freed_memory() -> None:
    """Once per process, on glibc (elsewhere a no-op): blocks up to 32 MB (glibc's maximum mmap
    threshold) come from the heap, and the heap is trimmed only above 1 GB free."""
    global _done
    if _done or not sys.platform.startswith("linux"):
        return
    _done = True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):  # not glibc (musl has no mallopt): the allocator stays as it is
        pass
