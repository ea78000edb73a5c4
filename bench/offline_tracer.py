"""Offline tracer benchmark: MiniLM tp=2 x 4 buckets (16,32,64,128), one run.

    .venv/bin/python -m bench.offline_tracer

Trace wall time with max_parallel_compilations 1 vs 2 (median of 3 each), and the peak RSS a rank
adds while building its shard from the checkpoint (VmHWM reset before func(), minus RSS then)
÷ the full checkpoint's size.
"""

import statistics
import tempfile
import time
from pathlib import Path

from bench.common import table
from tracer.builder.encoder_checkpoint import trace_checkpoint
from tracer.builder.model_source import default_model_dir

BUCKETS = [16, 32, 64, 128]


def trace_once(tp: int, parallel: int) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        info = trace_checkpoint(default_model_dir(), tp, BUCKETS, Path(out), max_parallel_compilations=parallel)
        return time.perf_counter() - started, info


def main() -> None:
    model_mb = (default_model_dir() / "model.safetensors").stat().st_size / 2**20
    walls = {p: statistics.median(trace_once(2, p)[0] for _ in range(3)) for p in (1, 2)}
    rows = [
        ["trace wall, max_parallel_compilations=1", f"{walls[1]:.2f} s", ""],
        ["trace wall, max_parallel_compilations=2", f"{walls[2]:.2f} s", f"{walls[2] / walls[1]:.2f}× (goal ≤ 0.65)"],
    ]
    for tp in (1, 2, 4):
        _, info = trace_once(tp, tp)
        added = max(t["build_peak_rss_mb"] for t in info.trace_timing)
        rows.append([f"peak RSS of building a shard, tp={tp} (worst rank)", f"{added:.0f} MiB",
                     f"{added / model_mb:.3f} of the model (goal ≤ {1 / tp + 0.05:.3f})"])
    print(f"MiniLM checkpoint: {model_mb:.1f} MiB")
    print(table(["MiniLM, 4 buckets", "value", "ratio"], rows))


if __name__ == "__main__":
    main()
