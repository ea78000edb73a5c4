"""Structured output's per-token cost, one run: xgrammar against llguidance (the two maintained engines
on the package index) on SmolLM2's 49,152-token vocabulary, constraining a 4-field object schema: the
time to fill the next token's mask and apply it to the logits, per token of a valid answer (fed token
by token, as generation does), and to compile the schema. What picked xgrammar (tracer/engine/grammar.py).

    .venv/bin/python -m bench.grammar_engines      # ~1 minute; needs the bench extra (llguidance)
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from bench.common import machine, table, write_results
from bench.generation import smollm2

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "cities": {"type": "array", "items": {"type": "string"}},
                                           "married": {"type": "boolean"}, "biography": {"type": "string"}},
          "required": ["name", "age", "cities", "married", "biography"], "additionalProperties": False}
ANSWER = {"name": "Ada Lovelace", "age": 36, "cities": ["London", "Marylebone", "Ockham"], "married": True,
          "biography": "An English mathematician and writer, chiefly known for her work on Charles Babbage's "
                       "proposed mechanical general-purpose computer, the Analytical Engine. She was the first to "
                       "recognise that the machine had applications beyond pure calculation, and published the "
                       "first algorithm intended to be carried out by such a machine."}
RUNS = 20


def xgrammar_engine(tokenizer):
    import xgrammar

    started = time.perf_counter()
    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer),
                                                   stop_token_ids=[tokenizer.eos_token_id])
    compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
    ready = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    compile_s = time.perf_counter() - ready

    def run(tokens: list[int]) -> list[float]:
        matcher, mask = xgrammar.GrammarMatcher(compiled), xgrammar.allocate_token_bitmask(1, info.vocab_size)
        logits, times = torch.zeros(1, info.vocab_size), []
        for token in tokens + [tokenizer.eos_token_id]:
            start = time.perf_counter()
            matcher.fill_next_token_bitmask(mask)
            xgrammar.apply_token_bitmask_inplace(logits, mask)
            times.append(time.perf_counter() - start)
            assert matcher.accept_token(token), token
        assert matcher.is_terminated()
        return times
    return ready - started, compile_s, run


def llguidance_engine(tokenizer):
    import llguidance
    import llguidance.hf
    import llguidance.torch

    started = time.perf_counter()
    lltokenizer = llguidance.hf.from_tokenizer(tokenizer)
    ready = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA), defaults={
        "whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
    llguidance.LLMatcher(lltokenizer, grammar)
    compile_s = time.perf_counter() - ready

    def run(tokens: list[int]) -> list[float]:
        matcher = llguidance.LLMatcher(lltokenizer, grammar)
        mask = llguidance.torch.allocate_token_bitmask(1, lltokenizer.vocab_size)
        logits, times = torch.zeros(1, lltokenizer.vocab_size), []
        for token in tokens + [tokenizer.eos_token_id]:
            start = time.perf_counter()
            llguidance.torch.fill_next_token_bitmask(matcher, mask, 0)
            llguidance.torch.apply_token_bitmask_inplace(logits, mask)
            times.append(time.perf_counter() - start)
            assert matcher.consume_token(token), matcher.get_error()
        assert matcher.is_stopped()
        return times
    return ready - started, compile_s, run


def main() -> None:
    _, tokenizer = smollm2()
    tokens = tokenizer(json.dumps(ANSWER), add_special_tokens=False)["input_ids"]  # ", " and ": " as tpserve's
    engines = {"xgrammar": xgrammar_engine(tokenizer), "llguidance": llguidance_engine(tokenizer)}
    measured = {name: [] for name in engines}
    for _ in range(RUNS):  # in turn: this VM's speed drifts
        for name, (_, _, run) in engines.items():
            measured[name].append(run(tokens))
    rows = []
    for name, (setup_s, compile_s, _) in engines.items():
        per_token = [t for answer in measured[name][2:] for t in answer]
        rows.append({"engine": name, "tokenizer_setup_ms": setup_s * 1e3, "compile_ms": compile_s * 1e3,
                     "mean_us": statistics.mean(per_token) * 1e6, "median_us": statistics.median(per_token) * 1e6,
                     "max_us": max(per_token) * 1e6,
                     "per_answer_ms": statistics.median(sum(a) for a in measured[name][2:]) * 1e3})
    print(machine())
    print(f"{len(tokens) + 1} tokens per answer (with the end), vocabulary {len(tokenizer)}")
    print(table(["engine", "tokenizer setup (ms)", "compile (ms)", "mask per token: mean (us)", "median (us)",
                 "max (us)", "per answer (ms)"],
                [[r["engine"], f"{r['tokenizer_setup_ms']:.0f}", f"{r['compile_ms']:.1f}", f"{r['mean_us']:.0f}",
                  f"{r['median_us']:.0f}", f"{r['max_us']:.0f}", f"{r['per_answer_ms']:.2f}"] for r in rows]))
    print(write_results("grammar_engines", rows, vocabulary=len(tokenizer), tokens=len(tokens) + 1))


if __name__ == "__main__":
    main()
