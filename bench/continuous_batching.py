"""Whole batches vs --continuous-batching vs --async-worker, served by one TorchServe: SmolLM2-135M-Instruct
tp 1 fp32, the same shards archived three ways (batch 4), each measured in turn, medians; and the same
shards in-process (the Generator, streaming through its callback) for what serving adds.

    .venv/bin/python -m bench.continuous_batching                  (~5 minutes)
    .venv/bin/python -m bench.continuous_batching --weights int4   (make serve's SmolLM2)

- per token: median gap between the lines of one stream (64 new tokens) — continuous batching pays a
  TorchServe round trip per token;
- first token: a short chat's first streamed line (its template prefix cached, as a chat's is);
- 4 streams: tokens per second of 4 concurrent 64-token streams;
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

MODES = {"smollm2": "whole batches", "smollm2-cb": "continuous batching", "smollm2-async": "async worker"}
IN_PROCESS = "in-process"


def _request(port: int, model: str, messages, new_tokens: int, stream: bool) -> list[float]:
    """Arrival times of the answer's lines (one line when not streamed), from the request's start."""
    return _answer(port, model, messages, new_tokens, stream)[0]


def _answer(port: int, model: str, messages, new_tokens: int, stream: bool) -> tuple[list[float], int]:
    """(arrival times of the answer's lines, tokens generated: its last line's usage)."""
    start = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    connection.request("POST", f"/predictions/{model}", headers={"Content-Type": "application/json"},
                       body=json.dumps({"messages": messages, "max_new_tokens": new_tokens, "stream": stream}))
    response = connection.getresponse()
    stamps, last = [], b""
    while line := response.readline():
        if line.strip():
            stamps.append(time.perf_counter() - start)
            last = line
    connection.close()
    return stamps, json.loads(last)["usage"]["completion_tokens"]


def per_token_ms(port: int, model: str) -> float:
    """(last line - first line) / (tokens - 1): a line may carry several tokens (continuous batching
    sends a step's, and prompt lookup makes several a step)."""
    stamps, tokens = _answer(port, model, STORY, 64, True)
    return (stamps[-1] - stamps[0]) / (tokens - 1) * 1000


def first_token_ms(port: int, model: str, round_: int) -> float:
    return _request(port, model, [{"role": "user", "content": f"Name a fruit, number {round_}."}], 4, True)[0] * 1000


def four_streams_tokens_s(port: int, model: str) -> float:
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        tokens = sum(n for _, n in pool.map(lambda _: _answer(port, model, STORY, 64, True), range(4)))
    return tokens / (time.perf_counter() - start)


def in_process(generator, round_: int) -> tuple[float, float, float]:
    """(per token ms, first token ms, 4 streams tokens/s) of the same requests in-process."""
    from tracer.engine.generator import SamplingParams

    def run(messages, n, streams=1):
        stamps, start = [], time.perf_counter()
        prompt = generator.encode(messages=messages)
        generator.generate([prompt] * streams, SamplingParams(max_new_tokens=n),
                           on_token=lambda *_: stamps.append(time.perf_counter() - start))
        return stamps

    story = run(STORY, 64)
    first = run([{"role": "user", "content": f"Name a fruit, number {round_}."}], 4)[0]
    start = time.perf_counter()
    tokens = len(run(STORY, 64, streams=4))
    return (story[-1] - story[0]) / (len(story) - 1) * 1000, first * 1000, tokens / (time.perf_counter() - start)


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
        subprocess.run([sys.executable, "-m", "tracer", "archive", "--shards", str(store / "smollm2.shards"),
                        "--model-name", "smollm2-async", "--export-path", str(store), "--archive-format",
                        "no-archive", "--async-worker"], check=True, capture_output=True)
        (Path(tmp) / "ts").mkdir()
        server = start_server(Path(tmp) / "ts", store, ",".join(MODES))
        port = server.ports["inference"]
        try:
            from tracer.engine.generator import Generator

            generator = Generator(store / "smollm2.shards")
            generator.warm_up()
            keys = ("token", "first", "streams", "short", "mean", "wall")
            results = {model: {k: [] for k in keys} for model in [*MODES, IN_PROCESS]}
            for model in MODES:
                _request(port, model, QUESTION, 8, True)  # warm
            for round_ in range(3):  # the modes in turn, three rounds
                token, first, streams = in_process(generator, round_)
                for key, value in (("token", token), ("first", first), ("streams", streams)):
                    results[IN_PROCESS][key].append(value)
                for model in MODES:
                    r = results[model]
                    r["token"].append(per_token_ms(port, model))
                    r["first"].append(first_token_ms(port, model, round_))
                    r["streams"].append(four_streams_tokens_s(port, model))
                    r["short"].append(short_behind_long_ms(port, model))
                    mean, wall = staggered(port, model)
                    r["mean"].append(mean)
                    r["wall"].append(wall)
        finally:
            server.stop()
    generator.close()
    rows = [[MODES.get(model, model), *(f"{statistics.median(r[k]):.1f}" if r[k] else "" for k in keys)]
            for model, r in results.items()]
    print(table([f"SmolLM2 tp=1 {weights}", "per token ms (1 stream)", "first token ms (short chat)",
                 "4 streams tokens/s",
                 "8-token request behind a 160-token stream, ms", "staggered: mean latency ms",
                 "staggered: all done ms"], rows))
    print("wrote", write_results("continuous_batching", rows_of(results, weights), rounds=3))


def rows_of(results: dict, weights: str) -> list[dict]:
    """The table's rows (bench/results/continuous_batching.json): results maps each model of MODES
    to its rounds' ms of "token", "short", "mean" and "wall"; the rows hold their medians."""
    def median(values):
        return statistics.median(values) if values else None

    return [{"mode": MODES.get(model, model), "weights": weights, "tp": 1,
             "per_token_ms": median(r["token"]), "first_token_ms": median(r.get("first", [])),
             "four_streams_tokens_s": median(r.get("streams", [])),
             "short_behind_long_ms": median(r["short"]),
             "staggered_mean_latency_ms": median(r["mean"]),
             "staggered_all_done_ms": median(r["wall"])} for model, r in results.items()]


if __name__ == "__main__":
    if sys.argv[1:] not in ([], ["--weights", "fp32"], ["--weights", "int8"], ["--weights", "int4"]):
        sys.exit("usage: python -m bench.continuous_batching [--weights fp32|int8|int4]")
    main(*sys.argv[2:])
