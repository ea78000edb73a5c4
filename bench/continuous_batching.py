"""Whole batches vs --continuous-batching, served by one TorchServe: SmolLM2-135M-Instruct tp 1 fp32,
the same shards archived both ways (batch 4), each measured in turn, medians.

    .venv/bin/python -m bench.continuous_batching                  (~5 minutes)
    .venv/bin/python -m bench.continuous_batching --weights int4   (make serve's SmolLM2)

- per token: median gap between the lines of one stream (64 new tokens) — continuous batching pays a
  TorchServe round trip per token;
- short behind long: latency of an 8-token request sent while a 160-token stream runs — with whole
  batches it waits for the long one;
- staggered: 8 requests (96, 8, 48, 16 new tokens, repeated) sent 0.3 s apart: mean latency and
  the wall time of all.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import table, write_results
from bench.generation import QUESTION, STORY

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from serving import start_server  # noqa: E402

MODES = {"smollm2": "whole batches", "smollm2-cb": "continuous batching"}


def _request(port: int, model: str, messages, new_tokens: int, stream: bool) -> list[float]:
    """Arrival times of the answer's lines (one line when not streamed), from the request's start."""
    start = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    connection.request("POST", f"/predictions/{model}", headers={"Content-Type": "application/json"},
                       body=json.dumps({"messages": messages, "max_new_tokens": new_tokens, "stream": stream}))
    response = connection.getresponse()
    stamps = []
    while line := response.readline():
        if line.strip():
            stamps.append(time.perf_counter() - start)
    connection.close()
    return stamps


def per_token_ms(port: int, model: str) -> float:
    stamps = _request(port, model, STORY, 64, True)
    return statistics.median(b - a for a, b in zip(stamps, stamps[1:], strict=False)) * 1000


def short_behind_long_ms(port: int, model: str) -> float:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        long_one = pool.submit(_request, port, model, STORY, 160, True)
        time.sleep(0.5)  # the long one is generating
        short = _request(port, model, QUESTION, 8, False)[-1]
        long_one.result()
    return short * 1000


def staggered(port: int, model: str) -> tuple[float, float]:
    lengths = [96, 8, 48, 16] * 2
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(lengths)) as pool:
        futures = []
        for n in lengths:
            futures.append(pool.submit(_request, port, model, STORY, n, False))
            time.sleep(0.3)
        latencies = [f.result()[-1] for f in futures]
    return statistics.mean(latencies) * 1000, (time.perf_counter() - start) * 1000


def main(weights: str = "fp32") -> None:
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        store = Path(tmp) / "store"
        subprocess.run([sys.executable, "-m", "tracer", "build", "--model", "smollm2", "--tp-degree", "1",
                        "--max-context", "512", "--model-name", "smollm2", "--export-path", str(store),
                        "--weights", weights, "--archive-format", "no-archive"], check=True, capture_output=True)
        subprocess.run([sys.executable, "-m", "tracer", "archive", "--shards", str(store / "smollm2.shards"),
                        "--model-name", "smollm2-cb", "--export-path", str(store), "--archive-format", "no-archive",
                        "--continuous-batching"], check=True, capture_output=True)
        (Path(tmp) / "ts").mkdir()
        server = start_server(Path(tmp) / "ts", store, ",".join(MODES))
        port = server.ports["inference"]
        try:
            results = {model: {"token": [], "short": [], "mean": [], "wall": []} for model in MODES}
            for model in MODES:
                _request(port, model, QUESTION, 8, True)  # warm
            for _ in range(3):  # the modes in turn, three rounds
                for model, r in results.items():
                    r["token"].append(per_token_ms(port, model))
                    r["short"].append(short_behind_long_ms(port, model))
                    mean, wall = staggered(port, model)
                    r["mean"].append(mean)
                    r["wall"].append(wall)
        finally:
            server.stop()
    rows = [[MODES[model], *(f"{statistics.median(r[k]):.0f}" if k != "token" else f"{statistics.median(r[k]):.1f}"
                              for k in ("token", "short", "mean", "wall"))] for model, r in results.items()]
    print(table([f"served SmolLM2 tp=1 {weights}", "per token ms (1 stream)",
                 "8-token request behind a 160-token stream, ms", "staggered: mean latency ms",
                 "staggered: all done ms"], rows))
    print("wrote", write_results("continuous_batching", rows_of(results, weights), rounds=3))


def rows_of(results: dict, weights: str) -> list[dict]:
    """The table's rows (bench/results/continuous_batching.json): results maps each model of MODES
    to its rounds' ms of "token", "short", "mean" and "wall"; the rows hold their medians."""
    return [{"mode": MODES[model], "weights": weights, "tp": 1,
             "per_token_ms": statistics.median(r["token"]),
             "short_behind_long_ms": statistics.median(r["short"]),
             "staggered_mean_latency_ms": statistics.median(r["mean"]),
             "staggered_all_done_ms": statistics.median(r["wall"])} for model, r in results.items()]


if __name__ == "__main__":
    if sys.argv[1:] not in ([], ["--weights", "fp32"], ["--weights", "int8"], ["--weights", "int4"]):
        sys.exit("usage: python -m bench.continuous_batching [--weights fp32|int8|int4]")
    main(*sys.argv[2:])
