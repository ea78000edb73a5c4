"""llama.cpp (llama-cpp-python) as a benchmark-only peer for bench/generation.py, on the same GGUF.

llama-cpp-python compiles llama.cpp from source (~15 minutes on 2 cores here), so it lives in its own
virtualenv under <repo>/.bench-venvs/llama-cpp (bench/peer_venv.py), and is measured in a
subprocess running that venv's Python: the prompt goes in as token ids (the same chat-templated ids
tpserve and Hugging Face get), greedy, n_threads as for the others.

    .venv/bin/python -m bench.llama_cpp_peer   # build (if needed) and print one measurement
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench import peer_venv

PACKAGES = ["llama-cpp-python==0.3.36"]

# Run by the peer venv's Python: argv = gguf path, prompt ids (JSON), new tokens, repeats, threads.
MEASURE = r"""
import json, statistics, sys, time
from llama_cpp import Llama
path, prompt, new_tokens, repeats, threads = sys.argv[1], json.loads(sys.argv[2]), *map(int, sys.argv[3:6])
llm = Llama(model_path=path, n_ctx=512, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False)
def run(n):
    llm.reset()  # no prompt-prefix reuse between runs: every run evaluates the whole prompt
    stamps, start = [], time.perf_counter()
    for token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        stamps.append(time.perf_counter())
        if len(stamps) == n:
            break
    return start, stamps
run(4)  # warm-up
first = statistics.median(s[0] - t for t, s in (run(1) for _ in range(repeats)))
gaps = []
for _ in range(3 if new_tokens > 1 else 0):
    stamps = run(new_tokens)[1]
    gaps += [b - a for a, b in zip(stamps, stamps[1:])]
print(json.dumps({"first_ms": first * 1000, "per_token_ms": statistics.median(gaps) * 1000 if gaps else 0.0}))
"""


def ensure_venv() -> Path | None:
    """Return the python of a virtualenv with llama-cpp-python built (building it once), or None."""
    return peer_venv.ensure_venv("llama-cpp", PACKAGES, "import llama_cpp")


def measure(python: Path, gguf: Path, first_prompt: list[int], story: list[int], new_tokens: int, repeats: int,
            threads: int = 2) -> tuple[float, float] | None:
    """(first-token ms for first_prompt, median ms between tokens generating from story), or None."""
    results = []
    for prompt, n in ((first_prompt, 1), (story, new_tokens)):
        try:
            out = subprocess.run([str(python), "-c", MEASURE, str(gguf), json.dumps(prompt), str(n), str(repeats),
                                  str(threads)], check=True, capture_output=True, text=True, timeout=1800)
        except subprocess.SubprocessError as error:
            print(f"llama.cpp peer failed: {error}", file=sys.stderr)
            return None
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return results[0]["first_ms"], results[1]["per_token_ms"]


if __name__ == "__main__":
    python = ensure_venv()
    print("llama.cpp peer:", python)
