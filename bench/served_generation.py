"""Served generation against llama.cpp's own C++ server, one run: SmolLM2-135M-Instruct as `make serve`
builds it (int4 from its Q4_1 GGUF, tp 1, batch 4), served by TorchServe with --continuous-batching
and with --async-worker, next to `llama-server` on the same GGUF (bench/llama_server_peer.py: -np 4,
its prompt cache on as by default), all through their OpenAI chat route, streamed, greedy; the
servers take turns in each of three rounds, medians:

- first token of a short chat (a system prompt every request shares, then a new question: both
  servers' prompt caches hold the shared part);
- per token: median gap between the content events of one 64-token stream;
- 4 streams: tokens per second of 4 concurrent 64-token streams;
- first token of an unseen ~700-token prompt.

    .venv/bin/python -m bench.served_generation      # ~10 minutes (+ llama-server's build the first time)
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

from bench import llama_server_peer
from bench.common import table, write_results
from bench.generation import QUALITY_TEXT

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from serving import start_server  # noqa: E402

SYSTEM = {"role": "system", "content": "You are a helpful assistant. Answer briefly and precisely, in plain "
                                       "English, and say so when you do not know."}
STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}]
NEW_TOKENS = 64


def stream(port: int, path: str, model: str, messages, max_tokens: int) -> tuple[list[float], int]:
    """(arrival times (s from the request's start) of the content events of one streamed chat, the
    tokens generated: its usage event's, else the events counted)."""
    start = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    connection.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    stamps, tokens = [], None
    while line := response.readline():
        line = line.strip()
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            event = json.loads(line[6:])
            if event.get("choices") and event["choices"][0].get("delta", {}).get("content"):
                stamps.append(time.perf_counter() - start)
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    connection.close()
    return stamps, tokens or len(stamps)


def measure(port: int, path: str, model: str, round_: int, long_prompt: str) -> dict:
    """A content event may carry several tokens (continuous batching sends a step's): per token is
    (last event - first event) / (tokens - 1), 4 streams count tokens."""
    first = stream(port, path, model, [SYSTEM, {"role": "user", "content": f"Name a fruit, number {round_}."}],
                   4)[0][0]
    story, tokens = stream(port, path, model, [SYSTEM, *STORY], NEW_TOKENS)
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        total = sum(n for _, n in pool.map(lambda i: stream(port, path, model, [SYSTEM, *STORY], NEW_TOKENS),
                                           range(4)))
    streams = total / (time.perf_counter() - start)
    long_first = stream(port, path, model, [{"role": "user", "content": f"{round_}. {long_prompt}"}], 4)[0][0]
    return {"first_token_ms": first * 1000, "per_token_ms": (story[-1] - story[0]) / (tokens - 1) * 1000,
            "four_streams_tokens_s": streams, "long_first_token_ms": long_first * 1000}


def main() -> None:
    from tracer.builder.gguf_import import smollm2_gguf

    gguf = smollm2_gguf()
    long_prompt = " ".join(QUALITY_TEXT.read_text().split()[:520])  # ~700 tokens with the template
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        store = Path(tmp) / "store"
        subprocess.run([sys.executable, "-m", "tracer", "build", "--model", "smollm2", "--tp-degree", "1",
                        "--weights", "int4", "--model-name", "smollm2", "--export-path", str(store),
                        "--archive-format", "no-archive", "--continuous-batching"], check=True, capture_output=True)
        subprocess.run([sys.executable, "-m", "tracer", "archive", "--shards", str(store / "smollm2.shards"),
                        "--model-name", "smollm2-async", "--export-path", str(store), "--archive-format",
                        "no-archive", "--async-worker"], check=True, capture_output=True)
        (Path(tmp) / "ts").mkdir()
        server = start_server(Path(tmp) / "ts", store, "smollm2,smollm2-async")
        peer = None
        try:
            peer = llama_server_peer.LlamaServer(gguf, slots=4, context=1024)
        except RuntimeError as exc:
            print(f"llama-server: skipped ({exc})")
        systems = {"tpserve, continuous batching": (server.ports["inference"],
                                                    "/predictions/smollm2/1.0/v1/chat/completions", "smollm2"),
                   "tpserve, async worker": (server.ports["inference"],
                                             "/predictions/smollm2-async/1.0/v1/chat/completions", "smollm2-async")}
        if peer is not None:
            systems["llama-server"] = (peer.port, "/v1/chat/completions", "smollm2")
        try:
            for port, path, model in systems.values():
                stream(port, path, model, [SYSTEM, *STORY], 8)  # warm
            results = {name: [] for name in systems}
            for round_ in range(3):
                for name, (port, path, model) in systems.items():
                    results[name].append(measure(port, path, model, round_, long_prompt))
        finally:
            server.stop()
            if peer is not None:
                peer.stop()
    keys = ("first_token_ms", "per_token_ms", "four_streams_tokens_s", "long_first_token_ms")
    medians = {name: {k: statistics.median(r[k] for r in rounds) for k in keys} for name, rounds in results.items()}
    peer_row = medians.get("llama-server")
    rows = []
    for name, m in medians.items():
        ratio = "" if peer_row is None or name == "llama-server" else " / ".join(
            f"{m[k] / peer_row[k]:.2f}×" for k in keys)
        rows.append([name, f"{m['first_token_ms']:.1f}", f"{m['per_token_ms']:.2f}",
                     f"{m['four_streams_tokens_s']:.0f}", f"{m['long_first_token_ms']:.0f}", ratio])
    print(table(["SmolLM2 int4, OpenAI chat, streamed", "first token ms (short chat)", "per token ms",
                 "4 streams tokens/s", "first token ms (~700-token prompt)",
                 "vs llama-server (first / per token / 4 streams / long)"], rows))
    print("wrote", write_results("served_generation", [{"system": k, **v} for k, v in medians.items()], rounds=3))


if __name__ == "__main__":
    main()
