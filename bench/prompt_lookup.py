"""Prompt-lookup decoding benchmark, one run: SmolLM2 int4 tp 1 (as `make serve` builds it) in-process,
greedy, asked to repeat and to edit a 200-word passage (answers that copy their prompt) and to write
freely, each with prompt lookup off and on, in turn; the mean time per generated token after the first,
the drafts accepted, and that the answers are the same. Goal (issue 37): repeat / edit with lookup <=
0.6x free writing's time per token; on by default only if free writing with it is <= 1.03x without.

    .venv/bin/python -m bench.prompt_lookup       # ~4 minutes
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import machine, table, write_results
from bench.generation import smollm2

PASSAGE = (
    "The lighthouse stood on a narrow spit of rock at the mouth of the bay, and for ninety years its lamp had "
    "turned every night without fail. The keeper, a quiet woman named Elin, climbed the one hundred and twelve "
    "steps at dusk to trim the wick, wind the clockwork and polish the great lens until it shone. Ships that "
    "passed in the dark never saw her, only the long white beam that swept across the water every ten seconds. "
    "In winter the storms came in from the west, and waves broke over the lower gallery, throwing spray as high "
    "as the lantern room. On those nights Elin did not sleep. She sat by the lamp with a pot of tea and a "
    "logbook, writing down the wind, the sea and every light she saw out on the water. In the spring the "
    "supply boat brought oil, flour, letters and news from the town. She read the letters slowly, twice, and "
    "answered each one before the boat returned. When the lamp was finally replaced by an automatic beacon, "
    "Elin stayed on the island for one more summer, walking the shore each evening to watch the new light "
    "turn on by itself.")
TASKS = {
    "repeat": f"Repeat the following passage exactly, word for word:\n\n{PASSAGE}",
    "edit": ("Rewrite the following passage, changing the keeper's name from Elin to Maria and nothing else:"
             f"\n\n{PASSAGE}"),
    "free": "Write a long story about a lighthouse keeper who lives alone on an island.",
}
NEW_TOKENS = 220
ROUNDS = 3


def timed(generator, prompt: list[int], lookup: bool) -> tuple[float, list[int], dict]:
    from tracer.engine.generator import SamplingParams

    stamps = []
    before = dict(generator.lookup_stats)
    generator.prefix.clear()  # each run prefills its prompt whole: the same work either way
    completion = generator.generate([prompt], SamplingParams(max_new_tokens=NEW_TOKENS, prompt_lookup=lookup),
                                    lambda *_: stamps.append(time.perf_counter()))[0]
    stats = {k: generator.lookup_stats[k] - before[k] for k in before}
    # several tokens of one verify call arrive together: the time per token is the span over the count
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1), completion.token_ids, stats


def main() -> None:
    _, tokenizer = smollm2()
    from bench.generation import chat_ids
    from tracer.engine.generator import Generator

    prompts = {task: chat_ids(tokenizer, [{"role": "user", "content": text}]) for task, text in TASKS.items()}
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "tracer", "build", "--model", "smollm2", "--tp-degree", "1",
                        "--weights", "int4", "--model-name", "smollm2", "--export-path", tmp,
                        "--archive-format", "no-archive"], check=True, capture_output=True)
        generator = Generator(Path(tmp) / "smollm2.shards")
        generator.warm_up()
        try:
            measured = {(task, lookup): [] for task in TASKS for lookup in (False, True)}
            answers, stats = {}, {}
            for _ in range(ROUNDS):  # every setting once a round: this VM's speed drifts
                for task, prompt in prompts.items():
                    for lookup in (False, True):
                        per_token, tokens, run_stats = timed(generator, prompt, lookup)
                        measured[task, lookup].append(per_token)
                        answers[task, lookup], stats[task, lookup] = tokens, run_stats
        finally:
            generator.close()
    free = statistics.median(measured["free", False])
    rows = []
    for (task, lookup), times in measured.items():
        ms = statistics.median(times) * 1e3
        s = stats[task, lookup]
        rows.append({"task": task, "prompt_lookup": lookup, "prompt_tokens": len(prompts[task]),
                     "new_tokens": len(answers[task, lookup]), "ms_per_token": ms, "vs_free_writing": ms / (free * 1e3),
                     "vs_off": ms / (statistics.median(measured[task, False]) * 1e3),
                     "verify_calls": s["calls"], "drafted": s["drafted"], "accepted": s["accepted"],
                     "same_answer": answers[task, lookup] == answers[task, False]})
    print(machine())
    print(table(["task", "lookup", "new tokens", "ms / token", "vs free writing (off)", "vs off", "verify calls",
                 "drafts accepted", "same answer"],
                [[r["task"], "on" if r["prompt_lookup"] else "off", r["new_tokens"], f"{r['ms_per_token']:.2f}",
                  f"{r['vs_free_writing']:.2f}x", f"{r['vs_off']:.2f}x", r["verify_calls"],
                  f"{r['accepted']}/{r['drafted']}", r["same_answer"]] for r in rows]))
    print(write_results("prompt_lookup", rows, model="SmolLM2-135M-Instruct int4, tp 1", rounds=ROUNDS))


if __name__ == "__main__":
    main()
