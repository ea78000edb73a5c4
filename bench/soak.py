"""Soak: concurrent clients with mixed-length texts against a real TorchServe serving tpserve.

    .venv/bin/python -m bench.soak [--minutes 10] [--clients 16]

Every answer is checked against the same model called in-process (max abs diff <= 1e-4); reports
failures, wrong answers, p50/p99 and the worker processes' RSS growth from the end of warm-up to
the end of the run. `make test` runs a 20-second version (tests/test_reliability.py).
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

WORDS = ("serving sharded transformer models with bucketed traced graphs keeps latency low while every rank "
         "holds only its own slice of the weights").split()


def mixed_texts(count: int = 64, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(1, 75))) for _ in range(count)]  # <= 128 tokens


def worker_rss_mb(frontend_pid: int) -> float:
    workers = [p for p in psutil.Process(frontend_pid).children(recursive=True)]
    return sum(p.memory_info().rss for p in workers) / 2**20


def soak(port: int, model: str, frontend_pid: int, texts: list[str], reference: dict[str, torch.Tensor],
         clients: int, seconds: float, warmup_s: float = 3.0) -> dict:
    latencies, failures, wrong, lock = [], [], [], threading.Lock()
    stop_at = time.monotonic() + seconds
    rss_after_warmup: list[float] = []

    def client(index: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        rng = random.Random(index)
        while time.monotonic() < stop_at:
            text = rng.choice(texts)
            started = time.monotonic()
            try:
                connection.request("POST", f"/predictions/{model}", body=text.encode(),
                                   headers={"Content-Type": "text/plain"})
                response = connection.getresponse()
                body = response.read()
            except (OSError, http.client.HTTPException) as exc:
                with lock:
                    failures.append(repr(exc))
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                continue
            elapsed = time.monotonic() - started
            with lock:
                if response.status != 200:
                    failures.append(f"HTTP {response.status}: {body[:100]!r}")
                elif (torch.tensor(json.loads(body)) - reference[text]).abs().max() > 1e-4:
                    wrong.append(text)
                latencies.append(elapsed)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(warmup_s)
    rss_after_warmup.append(worker_rss_mb(frontend_pid))
    for thread in threads:
        thread.join()
    rss_end = worker_rss_mb(frontend_pid)
    latencies.sort()
    return {"requests": len(latencies), "failed": len(failures), "wrong": len(wrong),
            "first_failures": failures[:3], "p50_ms": statistics.median(latencies) * 1000,
            "p99_ms": latencies[int(0.99 * (len(latencies) - 1))] * 1000,
            "rss_after_warmup_mb": rss_after_warmup[0], "rss_end_mb": rss_end,
            "rss_growth": rss_end / rss_after_warmup[0] - 1, "seconds": seconds, "clients": clients}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args()
    from serving import build_mar, start_server

    from tracer.engine.embedder import Embedder

    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        build_mar(store, batch_size=8)
        texts = mixed_texts()
        embedder = Embedder(store / "minilm.shards")
        reference = {t: torch.tensor(v) for t, v in zip(texts, embedder.embed(texts), strict=True)}
        embedder.close()
        server = start_server(Path(tmp), store)
        try:
            result = soak(server.ports["inference"], "minilm", server.process.pid, texts, reference, args.clients,
                          args.minutes * 60)
        finally:
            server.stop()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
