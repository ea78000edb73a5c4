"""Prefix caching benchmark, one run: the time to the first token of a 5-turn chat's last turn (~700
tokens of history, the model's own answers resent as a client does) with its history in the prefix
cache, against the same chat sent afresh (a one-character change at its start: nothing cached), on
SmolLM2 int4 tp 1 as `make serve` builds it (continuous batching, max context 1024), served through
TorchServe (native route, streamed: the first line is the first token) and in-process; pairs in turn,
medians. Goal (issue 37): cached <= 0.3x uncached.

    .venv/bin/python -m bench.prefix_cache       # ~5 minutes
"""

from __future__ import annotations

import http.client
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import machine, table, write_results
from bench.generation import smollm2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from serving import start_server  # noqa: E402

TURNS = ["Tell me about the history of lighthouses, in detail.",
         "How did their lamps and lenses change over the centuries?",
         "What was daily life like for a lighthouse keeper?",
         "Which are the most famous lighthouses in the world, and why?",
         "Summarize everything we discussed in three sentences."]
ANSWER_TOKENS = 150  # per earlier turn: 4 answers + 5 questions + the template, ~700 tokens at the last
PAIRS = 5


def chat(send, tag: str) -> tuple[list[dict], float]:
    """Turns 1-4 through `send(messages, max_new_tokens) -> (first-token seconds, text)`, each answer
    appended as the assistant's message; then the last turn: its messages and first-token seconds."""
    messages = [{"role": "system", "content": f"{tag} You are a helpful assistant."}]
    for question in TURNS[:-1]:
        messages.append({"role": "user", "content": question})
        _, text = send(messages, ANSWER_TOKENS)
        messages.append({"role": "assistant", "content": text})
    messages.append({"role": "user", "content": TURNS[-1]})
    first, _ = send(messages, 4)
    return messages, first


def served_sender(port: int):
    def send(messages: list[dict], new_tokens: int) -> tuple[float, str]:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        start = time.perf_counter()
        connection.request("POST", "/predictions/smollm2", body=json.dumps(
            {"messages": messages, "max_new_tokens": new_tokens, "stream": True}),
            headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        lines = [response.readline()]
        first = time.perf_counter() - start
        lines += response.read().splitlines()
        connection.close()
        return first, "".join(json.loads(line)["text"] for line in lines if line.strip())
    return send


def in_process_sender(generator):
    from tracer.engine.generator import SamplingParams

    def send(messages: list[dict], new_tokens: int) -> tuple[float, str]:
        arrived, first = time.perf_counter(), []
        prompt = generator.encode(messages=messages)

        def on_token(*_):
            if not first:
                first.append(time.perf_counter() - arrived)
        completion = generator.generate([prompt], SamplingParams(max_new_tokens=new_tokens), on_token)[0]
        return first[0], completion.text
    return send


def measure(send, prompt_tokens) -> dict:
    """PAIRS pairs: a fresh 5-turn chat's last turn (cached) and the same messages under another tag
    (uncached), in turn."""
    cached, uncached, lengths = [], [], []
    for i in range(PAIRS + 1):
        messages, first = chat(send, f"[chat {i}]")
        other = [{**messages[0], "content": messages[0]["content"].replace("[", "{", 1)}] + messages[1:]
        fresh, _ = send(other, 4)
        if i:  # the first pair warms the longer prompt graphs up
            cached.append(first)
            uncached.append(fresh)
            lengths.append(prompt_tokens(messages))
    c, u = statistics.median(cached) * 1e3, statistics.median(uncached) * 1e3
    return {"prompt_tokens": int(statistics.median(lengths)), "cached_ms": c, "uncached_ms": u, "ratio": c / u}


def main() -> None:
    directory, tokenizer = smollm2()
    from bench.generation import chat_ids
    from tracer.engine.generator import Generator

    def prompt_tokens(messages):
        return len(chat_ids(tokenizer, messages))

    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        subprocess.run([sys.executable, "-m", "tracer", "build", "--model", "smollm2", "--tp-degree", "1",
                        "--weights", "int4", "--model-name", "smollm2", "--export-path", str(store),
                        "--archive-format", "no-archive", "--continuous-batching"], check=True, capture_output=True)
        (Path(tmp) / "ts").mkdir()
        server = start_server(Path(tmp) / "ts", store, "smollm2")
        try:
            served = measure(served_sender(server.ports["inference"]), prompt_tokens)
        finally:
            server.stop()
        generator = Generator(store / "smollm2.shards")
        generator.warm_up()
        try:
            local = measure(in_process_sender(generator), prompt_tokens)
        finally:
            generator.close()
    rows = [{"where": "served (TorchServe, continuous batching)", **served},
            {"where": "in-process", **local}]
    print(machine())
    print(table(["where", "last turn's prompt tokens", "first token, cached (ms)", "uncached (ms)", "ratio"],
                [[r["where"], r["prompt_tokens"], f"{r['cached_ms']:.1f}", f"{r['uncached_ms']:.1f}",
                  f"{r['ratio']:.2f}x"] for r in rows]))
    print(write_results("prefix_cache", rows, model="SmolLM2-135M-Instruct int4, tp 1", pairs=PAIRS))


if __name__ == "__main__":
    main()
