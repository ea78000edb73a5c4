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

from bench.common import table, write_results
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
    peaks = {}  # tp -> MiB, for the JSON rows
    for tp in (1, 2, 4):
        _, info = trace_once(tp, tp)
        added = peaks[tp] = max(t["build_peak_rss_mb"] for t in info.trace_timing)
        rows.append([f"peak RSS of building a shard, tp={tp} (worst rank)", f"{added:.0f} MiB",
                     f"{added / model_mb:.3f} of the model (goal ≤ {1 / tp + 0.05:.3f})"])
    print(f"MiniLM checkpoint: {model_mb:.1f} MiB")
    print(table(["MiniLM, 4 buckets", "value", "ratio"], rows))
    print("wrote", write_results("offline_tracer", rows_of(walls, peaks, model_mb), buckets=BUCKETS,
                                 model_mib=model_mb))


def rows_of(walls: dict[int, float], peaks: dict[int, float], model_mb: float) -> list[dict]:
    """The table's rows (bench/results/offline_tracer.json): tp=2's trace wall seconds per
    max_parallel_compilations, then per tp the worst rank's peak RSS building its shard (MiB) and
    its fraction of the checkpoint's size; the other measure of each row is None."""
    return ([{"tp": 2, "max_parallel_compilations": p, "trace_wall_s": wall, "build_peak_rss_mib": None,
              "of_model": None} for p, wall in walls.items()] +
            [{"tp": tp, "max_parallel_compilations": tp, "trace_wall_s": None, "build_peak_rss_mib": mib,
              "of_model": mib / model_mb} for tp, mib in peaks.items()])


if __name__ == "__main__":
    main()
