"""Generation benchmark, one run: SmolLM2-135M-Instruct, time to first token and per-token latency at
1 and 4 concurrent streams, tpserve in-process at tp 1 / 2 / 3 (fp32) and tp 1 / 2 with int8 and
int4 weights, and served (REST, streamed) at tp 1, next to Hugging Face generate() and llama.cpp
(llama-cpp-python on the same GGUF, built in its own venv: bench/llama_cpp_peer.py) in the same run and
the memory-bandwidth limit (weight bytes read per token ÷ this machine's measured copy bandwidth);
then where the served first token's time goes, per-token time against the max context (the KV
cache's size), and each model's quality next to Hugging Face fp32 (teacher-forced on a fixed text:
top-1 agreement, perplexity).

    .venv/bin/python -m bench.generation
    .venv/bin/python -m bench.generation --served   # only the served first token and where it goes
    .venv/bin/python -m bench.generation --kv-cache # only per token against the max context
    .venv/bin/python -m bench.generation --rounds   # only per token, int4 / int8 and llama.cpp in turns
"""

from __future__ import annotations

import http.client
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

from bench import llama_cpp_peer
from bench.common import machine, table, write_results

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from serving import start_server  # noqa: E402

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]  # 37 tokens with the chat template
STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}]
NEW_TOKENS = 64
QUALITY_TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "quality_text.txt"  # ~350 tokens
REPEATS = 5


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The chat template's token ids, as the server tokenizes a chat request."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def smollm2():
    """SmolLM2's checkpoint folder (converted from the GGUF once) and its tokenizer; 2 threads, as
    every system here runs."""
    from transformers import AutoTokenizer

    from tracer.builder.gguf_import import convert_gguf, smollm2_gguf

    torch.set_num_threads(2)
    directory = convert_gguf(smollm2_gguf())
    return directory, AutoTokenizer.from_pretrained(str(directory))


def built_generator(directory: Path, tp: int, shards: Path, weights: str = "fp32"):
    """SmolLM2 built into `shards` as the in-process rows use it (max context 512, batch 4), loaded and
    warmed up."""
    from tracer.builder.decoder_checkpoint import trace_decoder
    from tracer.engine.generator import Generator

    config = json.loads((directory / "config.json").read_text())
    trace_decoder(directory, config, tp, shards, max_context=512, batch_size=4, weights=weights)
    generator = Generator(shards)
    generator.warm_up()
    return generator


def copy_bandwidth_gbs() -> float:
    """Best of 5 copies of 512 MiB, bytes read + written per second."""
    a, b = torch.empty(2**27), torch.empty(2**27)
    a.fill_(1.0)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - start)
    return 2 * a.numel() * 4 / best / 1e9


def hf_reference(directory: Path, tokens: list[int]) -> tuple[list[int], float]:
    """Teacher-forced Hugging Face fp32 on a fixed text: its top-1 prediction for each token after the
    first, and its perplexity on them."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(directory)).eval()
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0, :-1]
    logprobs = torch.log_softmax(logits, -1)[torch.arange(len(tokens) - 1), torch.tensor(tokens[1:])]
    return logits.argmax(-1).tolist(), math.exp(-logprobs.mean().item())


def hf_row(directory: Path, prompt: list[int]) -> tuple[float, float, list[int]]:
    """(first-token ms, ms per token, the first 6 greedy tokens: a peer's answer is checked against them)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(directory)).eval()
    ids = torch.tensor([prompt])

    def run(n: int) -> float:
        with torch.no_grad():
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            return time.perf_counter() - start

    run(4)
    first = statistics.median(run(1) for _ in range(REPEATS))
    whole = statistics.median(run(NEW_TOKENS) for _ in range(3))
    with torch.no_grad():
        # 6: no end-of-sequence token among them, which HF would replace when forced to continue
        greedy = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)[0, len(prompt):].tolist()
    return first * 1000, (whole - first) / (NEW_TOKENS - 1) * 1000, greedy


def timed_generate(generator, prompts: list[list[int]], new_tokens: int) -> tuple[float, float, float]:
    """(first-token ms of the first row, median ms between a row's tokens, total tokens/s)."""
    from tracer.engine.generator import SamplingParams

    stamps: dict[int, list[float]] = {i: [] for i in range(len(prompts))}
    start = time.perf_counter()
    generator.generate(prompts, SamplingParams(max_new_tokens=new_tokens),
                       lambda row, token, done: stamps[row].append(time.perf_counter()))
    wall = time.perf_counter() - start
    gaps = [b - a for times in stamps.values() for a, b in zip(times, times[1:], strict=False)]
    tokens = sum(len(t) for t in stamps.values())
    return (stamps[0][0] - start) * 1000, statistics.median(gaps) * 1000 if gaps else 0.0, tokens / wall


def in_process_rows(directory: Path, question: list[int], story: list[int], tp: int, workdir: Path,
                    weights: str = "fp32", quality: dict | None = None) -> list:
    generator = built_generator(directory, tp, workdir / f"tp{tp}-{weights}", weights)
    if quality is not None:  # teacher-forced on the fixed text, next to Hugging Face fp32's predictions
        text = quality["tokens"]
        top1, logprobs = generator.teacher_forced(text[:1], text[1:])
        quality["agreement"] = sum(a == b for a, b in zip(top1, quality["hf_top1"], strict=True)) / len(top1)
        quality["perplexity"] = math.exp(-sum(logprobs) / len(logprobs))
    one = [timed_generate(generator, [question], 1)[0] for _ in range(REPEATS)]
    per_token = [timed_generate(generator, [story], NEW_TOKENS)[1] for _ in range(3)]
    four = [timed_generate(generator, [story] * 4, NEW_TOKENS) for _ in range(3)]
    single_rate = [timed_generate(generator, [story], NEW_TOKENS)[2] for _ in range(3)]
    generator.close()
    return [statistics.median(one), statistics.median(per_token), statistics.median(f[1] for f in four),
            statistics.median(f[2] for f in four), statistics.median(single_rate)]


MAX_CONTEXTS = (512, 2048, 8192)  # SmolLM2 reads up to 8192 positions
LONG_PROMPT = 950  # tokens: its 64 new tokens attend the 1024-position context bucket


def kv_cache_rows(directory: Path, story: list[int], text: list[int], workdir: Path) -> list[tuple]:
    """Per-token ms at tp 1, fp32, one row, for models built with a growing max context (so a
    growing KV cache): the same positions attended cost the same whatever the cache's size, since a
    step writes its new keys and values in place (O(new tokens)) and attends its context bucket
    only; attending more positions (a 950-token prompt's tokens, bucket 1024) costs the attention.
    The long prompt: the quality text's tokens, repeated. Rows: (max context, KV cache MB per rank,
    per-token ms of the short prompt, of the long one or None where it does not fit)."""
    from tracer.builder.decoder_checkpoint import trace_decoder
    from tracer.engine.generator import Generator

    config = json.loads((directory / "config.json").read_text())
    long_prompt = (text * (LONG_PROMPT // len(text) + 1))[:LONG_PROMPT]
    rows = []
    for max_context in MAX_CONTEXTS:
        shards = workdir / f"context-{max_context}"
        long_fits = max_context >= LONG_PROMPT + NEW_TOKENS
        trace_decoder(directory, config, 1, shards, prefill=[64, 1024] if long_fits else [64],
                      max_context=max_context, batch_size=1)
        states = json.loads((shards / "manifest.json").read_text())["runtime_states"]  # rank 0's caches
        cache_mb = sum(math.prod(state["shape"]) * 4 for state in states.values()) / 1e6  # fp32
        generator = Generator(shards)
        generator.warm_up()
        short = statistics.median(timed_generate(generator, [story], NEW_TOKENS)[1] for _ in range(3))
        long = (statistics.median(timed_generate(generator, [long_prompt], NEW_TOKENS)[1] for _ in range(3))
                if long_fits else None)
        generator.close()
        rows.append((max_context, cache_mb, short, long))
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def print_kv_cache(rows: list[tuple], story: list[int]) -> None:
    print(f"per token against the max context (tp=1, fp32, batch 1, {NEW_TOKENS} new tokens; ms):")
    print(table(["max context", "KV cache MB per rank",
                 f"positions {len(story)}–{len(story) + NEW_TOKENS} (bucket 128)",
                 f"positions {LONG_PROMPT}–{LONG_PROMPT + NEW_TOKENS} (bucket 1024)"],
                [[str(context), f"{mb:.0f}", f"{short:.1f}", "" if long is None else f"{long:.1f}"]
                 for context, mb, short, long in rows]))


def kv_cache_json(rows: list[tuple], story: list[int]) -> list[dict]:
    """kv_cache_rows' rows with named keys (bench/results/generation_kv_cache.json)."""
    return [{"max_context": context, "kv_cache_mb_per_rank": mb, "prompt_tokens": len(story), "per_token_ms": short,
             "long_prompt_tokens": LONG_PROMPT, "per_token_ms_long_prompt": long} for context, mb, short, long in rows]


FRESH_PAIRS, WARM_PAIRS = 12, 30  # counted pairs of first tokens (served, in-process) on a fresh and a warm server
FRONTEND_WARM_UP = 3000  # cheap requests before the warm measurement (TorchServe's JVM compiles its hot paths)
SERVED_PARTS = ["before handler", "parse", "model", "answer", "handler's rest", "after handler"]


def served_first_token_ms(workdir: Path) -> dict:
    """Served and in-process first-token ms at tp 1: requests to the server and to an in-process
    Generator on the same shards in turn, the median of each pair's difference (one long pass each
    drifts with the VM), on the fresh server and again after FRONTEND_WARM_UP malformed requests
    (400s: TorchServe's own round trip, HTTP to the worker and back, whose Java code runs slower until
    the JVM has compiled it: ~6 ms fresh, ~3.7 ms warm here); also that round trip itself, warm. The
    in-process side includes the chat template, as the server does. Where the served time goes
    (warm): the worker's own timings (handler/timings.py) joined with the client's send and
    first-line times: before the handler (client, frontend, queue with up to maxBatchDelay, IPC), its
    phases, after it."""
    from tracer.engine.generator import Generator, SamplingParams

    store = workdir / "store"
    subprocess.run([sys.executable, "-m", "tracer", "build", "--model", "smollm2", "--tp-degree", "1",
                    "--max-context", "512", "--model-name", "smollm2", "--export-path", str(store),
                    "--archive-format", "no-archive"], check=True, capture_output=True)
    (workdir / "ts").mkdir()
    timings = workdir / "timings.jsonl"
    os.environ["TPSERVE_TIMINGS"] = str(timings)  # the worker inherits it
    try:
        server = start_server(workdir / "ts", store, "smollm2")
    finally:
        os.environ.pop("TPSERVE_TIMINGS")
    generator = Generator(store / "smollm2")
    generator.warm_up()
    connection = http.client.HTTPConnection("127.0.0.1", server.ports["inference"], timeout=120)
    sent: dict[str, tuple[float, float]] = {}  # request id -> (sent, first line received), wall clock

    def timed(body: str, first_line: bool) -> float:
        request_id = f"bench-{len(sent)}"
        start = time.time()
        connection.request("POST", "/predictions/smollm2", body=body, headers={
            "Content-Type": "application/json", "X-Request-Id": request_id})
        response = connection.getresponse()
        if first_line:
            response.readline()  # the first line carries the first token
        received = time.time()
        response.read()
        sent[request_id] = (start, received)
        return received - start

    def in_pairs(pairs: int) -> tuple[float, float, float, dict[str, float], list[str]]:
        """A request to the server and one to the in-process Generator in turn (which goes first
        alternates), the first 2 pairs not counted: each pair's difference sees the same minute of
        this VM, whose speed drifts by ±10 ms of a first token between blocks of requests. (Measured:
        two in-process copies of the fp32 weights, 55.6 / 56.9 ms alternating request by request,
        57.9 / 57.2 in blocks of 5: the copies do not slow each other down.) Returns the two medians,
        the median of the pairs' differences, the in-process parse and model medians, and the served
        requests' ids."""
        body = json.dumps({"messages": QUESTION, "max_new_tokens": 1, "stream": True})
        served, local, ids, local_parts = [], [], [], {"parse": [], "model": []}
        for i in range(pairs + 2):
            pair = {}
            for side in (("served", "local") if i % 2 == 0 else ("local", "served")):
                time.sleep(0.1)
                if side == "served":
                    pair["served"] = timed(body, first_line=True)
                    request_id = f"bench-{len(sent) - 1}"
                    continue
                start = time.perf_counter()
                prompt = generator.encode(messages=QUESTION)
                parsed = time.perf_counter()
                generator.generate([prompt], SamplingParams(max_new_tokens=1))
                pair["local"] = time.perf_counter() - start
                pair["parse"], pair["model"] = parsed - start, time.perf_counter() - parsed
            if i >= 2:
                served.append(pair["served"])
                local.append(pair["local"])
                ids.append(request_id)
                local_parts["parse"].append(pair["parse"])
                local_parts["model"].append(pair["model"])
        differences = [a - b for a, b in zip(served, local, strict=True)]
        return (statistics.median(served) * 1000, statistics.median(local) * 1000,
                statistics.median(differences) * 1000,
                {k: statistics.median(v) * 1000 for k, v in local_parts.items()}, ids)

    try:
        fresh = in_pairs(FRESH_PAIRS)
        result = {"served fresh": fresh[0], "in-process fresh": fresh[1], "difference fresh": fresh[2]}
        round_trips = [timed("{", first_line=False) for _ in range(FRONTEND_WARM_UP)]
        result["round trip"] = statistics.median(round_trips[-100:]) * 1000
        time.sleep(10)  # the JVM's compiler threads finish (they took one of the 2 cores from both sides)
        result["served"], result["in-process"], result["difference"], result["local parts"], ids = in_pairs(WARM_PAIRS)
        after_model = []  # the same round trip when a first token has just streamed the weights through the caches
        for _ in range(20):
            generator.generate([generator.encode(messages=QUESTION)], SamplingParams(max_new_tokens=1))
            after_model.append(timed("{", first_line=False))
        result["round trip after model"] = statistics.median(after_model) * 1000
        after_pause = []  # and after 0.1 s of nothing: TorchServe's threads wake from sleep (no model ran)
        for _ in range(20):
            time.sleep(0.1)
            after_pause.append(timed("{", first_line=False))
        result["round trip after pause"] = statistics.median(after_pause) * 1000
        connection.close()
        result["parts"] = served_parts(ids, sent, timings)
        return result
    finally:
        generator.close()
        server.stop()


def served_parts(ids: list[str], sent: dict[str, tuple[float, float]], timings: Path) -> dict[str, float]:
    """Median ms of each part of the served requests' time to first token (medians: the parts add up
    only roughly)."""
    lines = {r["id"]: r for r in map(json.loads, timings.read_text().splitlines())}
    parts = {name: [] for name in SERVED_PARTS}
    for request_id in ids:
        r, (start, received) = lines[request_id], sent[request_id]
        own, shared = r["own"], r["shared"]
        parse, model, answer = own.get("parse", 0), shared.get("model", 0), shared.get("answer", 0)
        parts["before handler"].append(r["start"] - start)
        parts["parse"].append(parse)
        parts["model"].append(model)
        parts["answer"].append(answer)
        parts["handler's rest"].append(r["end"] - r["start"] - parse - model - answer)
        parts["after handler"].append(received - r["end"])
    return {name: statistics.median(v) * 1000 for name, v in parts.items()}


def print_served(served: dict) -> None:
    print(f"served − in-process first token (tp=1, a request to each side in turn, the median of {WARM_PAIRS} "
          f"pairs' differences, chat template on both sides): {served['difference']:.1f} ms (medians "
          f"{served['served']:.0f} vs {served['in-process']:.0f} ms) after {FRONTEND_WARM_UP} requests "
          f"(TorchServe's round trip for a malformed request, warm, back to back: {served['round trip']:.1f} ms; "
          f"after 0.1 s idle: {served['round trip after pause']:.1f} ms); on the fresh "
          f"server ({FRESH_PAIRS} pairs): {served['difference fresh']:.1f} ms ({served['served fresh']:.0f} vs "
          f"{served['in-process fresh']:.0f} ms)")
    parts, local = served["parts"], served["local parts"]
    print(f"where the first token's time goes, warm (medians, ms; parse: the chat template and tokenizing); "
          f"TorchServe's round trip for a malformed request right after an in-process first token: "
          f"{served['round trip after model']:.1f} ms:")
    print(table(["", *SERVED_PARTS, "all but the model"],
                [["served", *(f"{parts[k]:.2f}" for k in SERVED_PARTS), f"{sum(parts.values()) - parts['model']:.2f}"],
                 ["in-process", "", f"{local['parse']:.2f}", f"{local['model']:.2f}", "", "", "",
                  f"{local['parse']:.2f}"]]))


def served_json(served: dict) -> tuple[list[dict], dict]:
    """served_first_token_ms' result as rows (the served first token's parts, ms; the in-process one's)
    and the scalars beside them (bench/results/generation_served.json)."""
    rows = [{"side": "served", "first_token_ms": served["served"], "parts_ms": served["parts"]},
            {"side": "in-process", "first_token_ms": served["in-process"], "parts_ms": served["local parts"]}]
    extra = {"difference_ms": served["difference"], "pairs": WARM_PAIRS, "served_fresh_ms": served["served fresh"],
             "in_process_fresh_ms": served["in-process fresh"], "difference_fresh_ms": served["difference fresh"],
             "fresh_pairs": FRESH_PAIRS, "round_trip_ms": served["round trip"],
             "round_trip_after_model_ms": served["round trip after model"],
             "round_trip_after_pause_ms": served["round trip after pause"]}
    return rows, extra


def write_served(served: dict) -> None:
    rows, extra = served_json(served)
    print("wrote", write_results("generation_served", rows, **extra))


def memory_floors(weight_bytes: float, int8_bytes: float, int4_bytes: float, bandwidth_gbs: float) -> dict:
    """weights -> (MB read per token, the per-token ms of reading them once at copy bandwidth)."""
    return {weights: (size / 1e6, size / bandwidth_gbs / 1e6)
            for weights, size in (("fp32", weight_bytes), ("int8", int8_bytes), ("int4", int4_bytes))}


def latency_rows(hf: tuple[float, float], llama: list[tuple[str, float, float]], tpserve: dict,
                 served_first_ms: float, floors: dict) -> list[dict]:
    """The latency table's rows (bench/results/generation.json), each with the same keys: hf is
    (first-token ms, per-token ms); llama (Peer.label(), first-token ms, per-token ms) per llama.cpp
    build; tpserve maps (tp, weights) to in_process_rows' [first-token ms, per-token ms, per-token ms
    at 4 streams, tokens/s at 4 streams, at 1]; floors: memory_floors'. Absent measures are None."""
    def row(system, label, weights, tp=None, first=None, token=None, token4=None, rate1=None, rate4=None, mb=None):
        return {"system": system, "label": label, "weights": weights, "tp": tp, "first_token_ms": first,
                "per_token_ms": token, "per_token_ms_4_streams": token4, "tokens_per_s_1_stream": rate1,
                "tokens_per_s_4_streams": rate4, "weights_mb": mb}

    rows = [row("Hugging Face", "Hugging Face generate, fp32, 2 threads", "fp32", first=hf[0], token=hf[1])]
    rows += [row("llama.cpp", f"llama.cpp, Q4_1 GGUF ({label})", "Q4_1", first=first, token=token)
             for label, first, token in llama]
    rows += [row("tpserve", f"tpserve in-process tp={tp}, {weights}", weights, tp, first, token, token4, rate1, rate4)
             for (tp, weights), (first, token, token4, rate4, rate1) in tpserve.items()]
    rows.append(row("tpserve served", "tpserve served tp=1 (REST, streamed), fp32", "fp32", 1, served_first_ms))
    rows += [row("memory floor", f"memory floor, {weights}", weights, token=ms, mb=mb)
             for weights, (mb, ms) in floors.items()]
    return rows


def quality_rows(quality: dict, hf_perplexity: float) -> list[dict]:
    """The quality table's rows (bench/results/generation_quality.json)."""
    return [{"tp": tp, "weights": weights, "top1_agreement": q["agreement"], "perplexity": q["perplexity"],
             "perplexity_vs_hf_fp32": q["perplexity"] / hf_perplexity} for (tp, weights), q in quality.items()]


def main() -> None:
    from tracer.builder.gguf_import import smollm2_gguf

    directory, tokenizer = smollm2()
    question, story = chat_ids(tokenizer, QUESTION), chat_ids(tokenizer, STORY)
    bandwidth = copy_bandwidth_gbs()
    with safe_open(str(directory / "model.safetensors"), "pt") as f:  # the tied LM head is stored once
        weight_bytes = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()) * 4
    floor_ms = weight_bytes / bandwidth / 1e9 * 1000  # every weight byte read once per token, at copy speed
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        linear = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if k.endswith("proj.weight"))
        head = math.prod(f.get_slice("model.embed_tokens.weight").get_shape())
    int8_bytes = (linear + head) * 1.125  # a byte per weight + a float16 scale and minimum per 32 weights
    int4_bytes = linear * 0.625 + head * 1.125  # half a byte + the same; the LM head int8
    hf_first, hf_token, hf_greedy = hf_row(directory, question)
    rows = [["Hugging Face generate, fp32, 2 threads", f"{hf_first:.0f}", f"{hf_token:.1f}", "", "", "1.00×"]]
    llama = []  # (first-token ms, per-token ms) of each llama.cpp configuration that runs here
    llama_rows = []  # (label, first-token ms, per-token ms), for the JSON rows
    for peer in llama_cpp_peer.peers(smollm2_gguf(), question, hf_greedy):
        measured = llama_cpp_peer.measure(peer, smollm2_gguf(), question, story, NEW_TOKENS, REPEATS)
        if measured:
            llama.append(measured)
            llama_rows.append((peer.label(), *measured))
            rows.append([f"llama.cpp ({llama_cpp_peer.PACKAGES[0]}, {peer.label()}), the same GGUF (Q4_1), 2 threads",
                         f"{measured[0]:.0f}", f"{measured[1]:.1f}", "", "", f"{measured[1] / hf_token:.2f}×"])
    if not llama:
        rows.append(["llama.cpp: skipped (llama-cpp-python could not be built or run; see stderr)", "", "", "", "", ""])
    # the goals compare with llama.cpp's best here: its fastest per-token time and first token
    llama_first, llama_token = (min(m[0] for m in llama), min(m[1] for m in llama)) if llama else (None, None)
    text = list(tokenizer(QUALITY_TEXT.read_text())["input_ids"])
    hf_top1, hf_perplexity = hf_reference(directory, text)
    results, quality = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for tp, weights in ((1, "fp32"), (2, "fp32"), (3, "fp32"), (1, "int8"), (2, "int8"), (1, "int4"), (2, "int4")):
            quality[tp, weights] = {"tokens": text, "hf_top1": hf_top1}
            results[tp, weights] = in_process_rows(directory, question, story, tp, Path(tmp), weights,
                                                   quality[tp, weights])
            first, token, token4, rate4, rate1 = results[tp, weights]
            rows.append([f"tpserve in-process tp={tp}" + (f", {weights} weights" if weights != "fp32" else ""),
                         f"{first:.0f}", f"{token:.1f}", f"{token4:.1f}",
                         f"{rate4:.0f} / {rate1:.0f} ({rate4 / rate1:.2f}×)", f"{token / hf_token:.2f}×"])
            print(rows[0], rows[-1], file=sys.stderr, flush=True)  # partial results, in case of a failure later
        served = served_first_token_ms(Path(tmp))
        kv_cache = kv_cache_rows(directory, story, text, Path(tmp))
    rows.append(["tpserve served tp=1 (REST, streamed)", f"{served['served']:.0f}", "", "", "", ""])
    rows.append([f"memory floor: {weight_bytes / 1e6:.0f} MB of fp32 weights ÷ {bandwidth:.0f} GB/s copy bandwidth",
                 "", f"{floor_ms:.1f}", "", "", ""])
    rows.append([f"memory floor, int8: {int8_bytes / 1e6:.0f} MB of int8 weights ÷ {bandwidth:.0f} GB/s", "",
                 f"{int8_bytes / bandwidth / 1e6:.1f}", "", "", ""])
    rows.append([f"memory floor, int4: {int4_bytes / 1e6:.0f} MB of int4 weights, scales and int8 head ÷ "
                 f"{bandwidth:.0f} GB/s", "", f"{int4_bytes / bandwidth / 1e6:.1f}", "", "", ""])
    print(f"machine: {machine()}")
    print(f"SmolLM2-135M-Instruct fp32; prompt {len(question)} tokens (first token), {len(story)} tokens + "
          f"{NEW_TOKENS} new (per token); copy bandwidth {bandwidth:.1f} GB/s (read + write)")
    print(table(["system", "first token ms", "per token ms (1 stream)", "per token ms (4 streams)",
                 "tokens/s 4 streams / 1 stream", "per token ÷ HF"], rows))
    if llama:
        print("against llama.cpp's best here, per token: " + ", ".join(
            f"tp={tp} {w} {results[tp, w][1] / llama_token:.2f}×" for tp, w in ((1, "int8"), (2, "int8"), (1, "int4"),
                                                                                 (2, "int4"))) +
              "; first token: " + ", ".join(f"tp={tp} {w} {results[tp, w][0] / llama_first:.2f}×" for tp, w in results))
    print_served(served)
    print_kv_cache(kv_cache, story)
    print(f"quality, teacher-forced on tests/data/quality_text.txt ({len(text)} tokens; HF fp32 perplexity "
          f"{hf_perplexity:.3f}):")
    print(table(["model", "top-1 agreement with HF fp32", "perplexity", "÷ HF fp32"],
                [[f"tp={tp} {weights}", f"{q['agreement']:.1%}", f"{q['perplexity']:.3f}",
                  f"{q['perplexity'] / hf_perplexity:.4f}"] for (tp, weights), q in quality.items()]))
    floors = memory_floors(weight_bytes, int8_bytes, int4_bytes, bandwidth)
    print("wrote", write_results("generation", latency_rows((hf_first, hf_token), llama_rows, results,
                                                            served["served"], floors),
                                 model="SmolLM2-135M-Instruct", llama_cpp=llama_cpp_peer.PACKAGES[0],
                                 bandwidth_gbs=bandwidth, first_token_prompt_tokens=len(question),
                                 per_token_prompt_tokens=len(story), new_tokens=NEW_TOKENS))
    write_served(served)
    print("wrote", write_results("generation_kv_cache", kv_cache_json(kv_cache, story)))
    print("wrote", write_results("generation_quality", quality_rows(quality, hf_perplexity),
                                 quality_text_tokens=len(text), hf_fp32_perplexity=hf_perplexity))


def kv_cache_only() -> None:
    directory, tokenizer = smollm2()
    story, text = chat_ids(tokenizer, STORY), list(tokenizer(QUALITY_TEXT.read_text())["input_ids"])
    with tempfile.TemporaryDirectory() as workdir:
        print(f"machine: {machine()}")
        rows = kv_cache_rows(directory, story, text, Path(workdir))
        print_kv_cache(rows, story)
        print("wrote", write_results("generation_kv_cache", kv_cache_json(rows, story)))


ROUNDS = 5


def rounds_against_llama_cpp(workdir: Path) -> None:
    """Per token, tpserve int4 and int8 (tp=1) and llama.cpp's best build, one after another in each of
    ROUNDS rounds: this VM's speed drifts within minutes, so the whole run's rows, minutes apart, can
    disagree on a ratio that measuring side by side settles."""
    from tracer.builder.gguf_import import smollm2_gguf
    from tracer.engine.generator import SamplingParams

    directory, tokenizer = smollm2()
    question, story = chat_ids(tokenizer, QUESTION), chat_ids(tokenizer, STORY)
    generators = {weights: built_generator(directory, 1, workdir / weights, weights) for weights in ("int4", "int8")}
    greedy: list[int] = []  # tpserve's greedy answer (Hugging Face's: tested), to check llama.cpp's
    generators["int4"].generate([question], SamplingParams(max_new_tokens=8),
                                lambda row, token, done: greedy.append(token) if token is not None else None)
    peer = next(iter(llama_cpp_peer.peers(smollm2_gguf(), question, greedy)), None)
    measured: dict[str, list[float]] = {"int4": [], "int8": [], "llama.cpp": []}
    for _ in range(ROUNDS):
        if peer:
            result = llama_cpp_peer.measure(peer, smollm2_gguf(), question, story, NEW_TOKENS, 3)
            if result:
                measured["llama.cpp"].append(result[1])
        for weights, generator in generators.items():
            measured[weights].append(statistics.median(timed_generate(generator, [story], NEW_TOKENS)[1]
                                                       for _ in range(3)))
    for generator in generators.values():
        generator.close()
    print(f"machine: {machine()}; copy bandwidth {copy_bandwidth_gbs():.1f} GB/s")
    print(f"per token ms, tp=1, {ROUNDS} rounds (llama.cpp: {peer.label() if peer else 'not built here'}):")
    rows = []
    for name, values in measured.items():
        if not values:
            continue
        ratio = ""
        if name != "llama.cpp" and measured["llama.cpp"]:
            ratios = [a / b for a, b in zip(values, measured["llama.cpp"], strict=False)]
            ratio = f"{statistics.median(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f}×)"
        rows.append([name, " / ".join(f"{v:.1f}" for v in values), f"{statistics.median(values):.1f}", ratio])
    print(table(["system", "per token each round", "median", "÷ llama.cpp in the same round, median (range)"], rows))
    print("wrote", write_results("generation_rounds", rounds_rows(measured), rounds=ROUNDS,
                                 llama_cpp=peer.label() if peer else None))


def rounds_rows(measured: dict[str, list[float]]) -> list[dict]:
    """rounds_against_llama_cpp's rows (bench/results/generation_rounds.json): per system its per-token
    ms in each round, their median, and the median, min and max of its ratio to llama.cpp's in the same
    round (None for llama.cpp itself or where it did not run)."""
    rows = []
    for name, values in measured.items():
        if not values:
            continue
        ratios = ([a / b for a, b in zip(values, measured["llama.cpp"], strict=False)]
                  if name != "llama.cpp" and measured["llama.cpp"] else [])
        rows.append({"system": name, "per_token_ms_each_round": values, "per_token_ms": statistics.median(values),
                     "vs_llama_cpp_median": statistics.median(ratios) if ratios else None,
                     "vs_llama_cpp_min": min(ratios) if ratios else None,
                     "vs_llama_cpp_max": max(ratios) if ratios else None})
    return rows


if __name__ == "__main__":
    if sys.argv[1:] == ["--served"]:  # only the served first token and where its time goes (~2 min)
        with tempfile.TemporaryDirectory() as workdir:
            print(f"machine: {machine()}")
            served = served_first_token_ms(Path(workdir))
            print_served(served)
            write_served(served)
    elif sys.argv[1:] == ["--kv-cache"]:  # only per token against the max context (~1.5 min)
        kv_cache_only()
    elif sys.argv[1:] == ["--rounds"]:  # only int4 / int8 and llama.cpp per token, in turns (~4 min)
        with tempfile.TemporaryDirectory() as workdir:
            rounds_against_llama_cpp(Path(workdir))
    else:
        main()
