"""bench.plots draws its charts from result files shaped as the benchmarks write them: the rows come from
the benchmarks' own row-building functions, fed with made-up numbers, and go through write_results."""

import functools
import struct

import pytest

from bench import common, continuous_batching, generation, offline_tracer, plots, serving, tracer_core

CHARTS = ["embeddings-throughput.png", "rerank.png", "generation-latency.png", "streams.png", "served-breakdown.png"]


@pytest.fixture
def results(tmp_path):
    """A results folder as full runs of bench.serving, bench.rerank and bench.generation leave it."""
    write_results = functools.partial(common.write_results, directory=tmp_path / "results")
    setups = [f"tpserve {c.label}" for c in serving.CONFIGS] + [
        "eager sentence-transformers, batchSize 1", "eager sentence-transformers, batchSize 8",
        "infinity-emb 0.0.78 (torch, batch 32)"]
    measured = {(s, texts, clients): {"p50": 3.0 + i + clients, "p99": 9.0 + i + clients,
                                      "rps": 120.0 - 5 * i + clients, "flops": 4e9 + i * 1e8}
                for i, s in enumerate(setups) for texts, _, clients in serving.WORKLOADS}
    measured["in-process tp 2 x 1 thread(s), 1 text per call", "short", 1] = {"p50": 2.0, "p99": 3.0, "rps": 400.0,
                                                                             "flops": 5e9}
    write_results("serving", serving.rows_of(measured, 2e10), gemm_gflops=20.0, rounds=2, quick=False)
    averaged = {}
    for i, s in enumerate(s for s in setups if s.startswith("tpserve")):
        for texts, _, clients in serving.WORKLOADS:
            parts = {p: 0.2 + 0.1 * j + (2.0 + 0.3 * i) * clients * (p == "model") for j, p in enumerate(serving.PARTS)}
            parts["batch's other requests"] = -0.01 if clients == 1 else 0.8 * clients  # -0.01: clock skew
            averaged[s, texts, clients] = {**parts, "total": sum(parts.values()), "batch size": 2.5}
    breakdowns = {key: [(means, {16: [1.2, 3.5, 40], 64: [4.1, 6.0, 12]})] for key, means in averaged.items()}
    write_results("serving_breakdown", serving.breakdown_rows(averaged), rounds=2, quick=False,
                  model_per_bucket=serving.bucket_rows(breakdowns))
    write_results("rerank", [{"setup": s, "clients": c, "p50_ms": 900.0 / c, "pairs_per_s": 80.0 + 20 * i + c}
                             for i, s in enumerate(["sentence-transformers CrossEncoder.predict, in-process, batch 32",
                                                    "tpserve fp32, tp 2 x 1 thread", "tpserve bf16, tp 2 x 1 thread",
                                                    "infinity-emb 0.0.78 /rerank, served (batch 32)"])
                             for c in (1, 4)], documents=100, tokens=12062, rounds=2, quick=False)
    tpserve = {(tp, w): [60.0 - 5 * tp, 12.0 - tp, 14.0 - tp, 240.0 + 10 * tp, 80.0 + tp]
               for tp, w in ((1, "fp32"), (2, "fp32"), (3, "fp32"), (1, "int8"), (2, "int8"), (1, "int4"), (2, "int4"))}
    floors = generation.memory_floors(538e6, 152e6, 98e6, 40.0)
    llama = [("native build, prompts token by token", 140.0, 6.1)]
    write_results("generation", generation.latency_rows((95.0, 21.0), llama, tpserve, 64.0, floors),
                  model="SmolLM2-135M-Instruct", bandwidth_gbs=40.0, first_token_prompt_tokens=37,
                  per_token_prompt_tokens=45, new_tokens=generation.NEW_TOKENS)
    return tmp_path / "results"


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path.name} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_each_chart_is_drawn_at_page_width(results, tmp_path):
    written = plots.main(["--results", str(results), "--out", str(tmp_path / "images")])
    assert [p.name for p in written] == CHARTS
    for path in written:
        width, height = png_size(path)
        assert width == plots.WIDTH_IN * plots.DPI, path.name  # 880 px: GitHub's page width
        assert 300 <= height <= 1400, (path.name, height)


def test_the_same_results_give_the_same_bytes(results, tmp_path):
    first = plots.main(["--results", str(results), "--out", str(tmp_path / "a")])
    second = plots.main(["--results", str(results), "--out", str(tmp_path / "b")])
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]


def test_a_chart_without_its_json_is_skipped(results, tmp_path, capsys):
    (results / "generation.json").unlink()
    (results / "serving_breakdown.json").unlink()
    written = plots.main(["--results", str(results), "--out", str(tmp_path / "images")])
    assert [p.name for p in written] == ["embeddings-throughput.png", "rerank.png"]
    skipped = [line for line in capsys.readouterr().err.splitlines() if "skipped" in line]
    assert [line.split(":")[0] for line in skipped] == ["generation-latency.png", "streams.png",
                                                        "served-breakdown.png"]


def test_the_other_benchmarks_rows_name_their_units():
    """The benchmarks without a chart write their rows too: each key with its unit (or none: counts)."""
    rows = continuous_batching.rows_of({"smollm2": {"token": [7.0, 7.2, 7.1], "first": [40.0, 50.0, 45.0],
                                                    "streams": [200.0] * 3, "short": [900.0] * 3,
                                                    "mean": [1500.0] * 3, "wall": [4000.0] * 3},
                                        "in-process": {"token": [6.0], "first": [30.0], "streams": [300.0],
                                                       "short": [], "mean": [], "wall": []}}, "int4")
    assert rows == [{"mode": "whole batches", "weights": "int4", "tp": 1, "per_token_ms": 7.1, "first_token_ms": 45.0,
                     "four_streams_tokens_s": 200.0, "short_behind_long_ms": 900.0,
                     "staggered_mean_latency_ms": 1500.0, "staggered_all_done_ms": 4000.0},
                    {"mode": "in-process", "weights": "int4", "tp": 1, "per_token_ms": 6.0, "first_token_ms": 30.0,
                     "four_streams_tokens_s": 300.0, "short_behind_long_ms": None,
                     "staggered_mean_latency_ms": None, "staggered_all_done_ms": None}]
    core = tracer_core.rows_of(eager=10.0, t1=5.0, t2=4.0, coordination=0.4, dispatch=0.02, t2_processes=4.5)
    assert [r["vs_tp1"] for r in core] == [2.0, 1.0, 0.8, None, None, 0.9, None]
    traced = offline_tracer.rows_of({1: 4.0, 2: 2.5}, {1: 88.0, 2: 46.0, 4: 25.0}, 86.7)
    assert [r["trace_wall_s"] for r in traced] == [4.0, 2.5, None, None, None]
    assert traced[3] == {"tp": 2, "max_parallel_compilations": 2, "trace_wall_s": None, "build_peak_rss_mib": 46.0,
                         "of_model": 46.0 / 86.7}
    rounds = generation.rounds_rows({"int4": [6.0, 6.6], "int8": [], "llama.cpp": [5.0, 6.0]})
    assert [(r["system"], r["per_token_ms"], r["vs_llama_cpp_max"]) for r in rounds] == [
        ("int4", 6.3, 1.2), ("llama.cpp", 5.5, None)]
    kv = generation.kv_cache_json([(512, 9.4, 11.0, None), (2048, 37.7, 11.1, 14.2)], story=list(range(45)))
    assert [(r["max_context"], r["per_token_ms_long_prompt"]) for r in kv] == [(512, None), (2048, 14.2)]
    served, extra = generation.served_json({
        "served": 70.0, "in-process": 62.0, "difference": 7.5, "served fresh": 75.0, "in-process fresh": 62.0,
        "difference fresh": 12.0, "round trip": 3.7, "round trip after model": 4.1, "round trip after pause": 5.0,
        "parts": {p: 1.0 for p in generation.SERVED_PARTS}, "local parts": {"parse": 1.5, "model": 60.5}})
    assert [r["side"] for r in served] == ["served", "in-process"] and extra["difference_ms"] == 7.5
