"""llama.cpp (llama-cpp-python) as a benchmark-only peer for bench/generation.py, on the same GGUF.

llama-cpp-python compiles llama.cpp from source (~15 minutes on 2 cores here), so it lives in its own
virtualenv under <repo>/.bench-venvs/llama-cpp (bench/peer_venv.py), and is measured in a
subprocess running that venv's Python: the prompt goes in as token ids (the same chat-templated ids
tpserve and Hugging Face get), greedy, n_threads as for the others.

    .venv/bin/python -m bench.llama_cpp_peer ["portable AVX2"]   # build (if needed), print its python
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench import peer_venv

PACKAGES = ["llama-cpp-python==0.3.36"]

# Run by the peer venv's Python: argv = gguf path, prompt ids (JSON), new tokens, repeats, threads, n_batch.
MEASURE = r"""
import json, statistics, sys, time
from llama_cpp import Llama
path, prompt, new_tokens, repeats, threads, batch = sys.argv[1], json.loads(sys.argv[2]), *map(int, sys.argv[3:7])
llm = Llama(model_path=path, n_ctx=512, n_threads=threads, n_threads_batch=threads, n_batch=batch, verbose=False)
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


# Run by the peer venv's Python: argv = gguf path, prompt ids (JSON), new tokens, n_batch; prints the greedy ids.
GREEDY = r"""
import json, sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=512, n_threads=2, n_threads_batch=2, n_batch=int(sys.argv[4]), verbose=False)
ids = []
for token in llm.generate(json.loads(sys.argv[2]), top_k=1, temp=0.0, reset=True):
    ids.append(token)
    if len(ids) == int(sys.argv[3]):
        break
print(json.dumps(ids))
"""

# llama.cpp built for this CPU (-march=native), prompts in one batch. On an Intel Xeon with AMX here,
# llama-cpp-python 0.3.36's native build crashed on prompts of 2+ tokens in one batch (its AMX
# kernels): there it is measured evaluating prompts token by token (n_batch 1: its per-token time is
# llama.cpp's, its time to first token is not) and, for prompts in one batch, built for any AVX2 CPU.
# Its answer is checked against Hugging Face's greedy tokens and shown, not required: with its int8
# activations (Q8_1) the AVX2 build answers the capital question "L'Étoile, la Marseilla…", as
# tpserve did when it tried int8 inputs (README); its AMX path, token by token, answers right.
# The AVX-512 build (no AMX) runs prompts in one batch on this CPU (the developers' guide): the fastest
# build that does.
AVX512 = ("-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON "
          "-DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON -DGGML_BMI2=ON")
BUILDS = {"native": {}, "portable AVX2": {"CMAKE_ARGS": "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON "
                                                        "-DGGML_FMA=ON -DGGML_F16C=ON",
                                          "PIP_NO_CACHE_DIR": "1"},  # not the native wheel from pip's cache
          "AVX-512": {"CMAKE_ARGS": AVX512, "PIP_NO_CACHE_DIR": "1"}}


@dataclass
class Peer:
    python: Path
    build: str
    batch: int  # n_batch: 1 = prompts token by token
    agrees: bool = True  # its greedy tokens for the check prompt are Hugging Face's

    def label(self) -> str:
        how = " build, prompts token by token" if self.batch == 1 else " build"
        return self.build + how + ("" if self.agrees else "; its answer differs from HF's")


def ensure_venv(build: str = "native") -> Path | None:
    """Return the python of a virtualenv with llama-cpp-python built (building it once), or None."""
    name = {"native": "llama-cpp", "portable AVX2": "llama-cpp-avx2", "AVX-512": "llama-cpp-avx512"}[build]
    return peer_venv.ensure_venv(name, PACKAGES, "import llama_cpp", BUILDS[build])


def greedy_ids(peer: Peer, gguf: Path, prompt: list[int], n: int) -> list[int] | None:
    try:
        out = subprocess.run([str(peer.python), "-c", GREEDY, str(gguf), json.dumps(prompt), str(n), str(peer.batch)],
                             check=True, capture_output=True, text=True, timeout=600)
    except subprocess.SubprocessError as error:
        print(f"llama.cpp peer failed: {str(error)[-200:]}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def peers(gguf: Path, prompt: list[int], expected: list[int]) -> list[Peer]:
    """The llama.cpp configurations that run here (see BUILDS), each knowing whether its greedy tokens
    for `prompt` are `expected` (Hugging Face's on the same weights)."""
    def tried(build: str, batch: int) -> Peer | None:
        python = ensure_venv(build)
        if python is None:
            return None
        peer = Peer(python, build, batch)
        got = greedy_ids(peer, gguf, prompt, len(expected))
        if got is None:  # it crashed or failed: not a configuration to measure
            return None
        peer.agrees = got == expected
        return peer

    native = tried("native", 512)
    found = [native] if native else [tried("native", 1), tried("AVX-512", 512)]
    return [peer for peer in found if peer]


def measure(peer: Peer, gguf: Path, first_prompt: list[int], story: list[int], new_tokens: int, repeats: int,
            threads: int = 2) -> tuple[float, float] | None:
    """(first-token ms for first_prompt, median ms between tokens generating from story), or None."""
    results = []
    for prompt, n in ((first_prompt, 1), (story, new_tokens)):
        try:
            out = subprocess.run([str(peer.python), "-c", MEASURE, str(gguf), json.dumps(prompt), str(n), str(repeats),
                                  str(threads), str(peer.batch)], check=True, capture_output=True, text=True,
                                 timeout=1800)
        except subprocess.SubprocessError as error:
            print(f"llama.cpp peer failed: {error}", file=sys.stderr)
            return None
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return results[0]["first_ms"], results[1]["per_token_ms"]


if __name__ == "__main__":
    build = sys.argv[1] if len(sys.argv) > 1 else "native"
    print("llama.cpp peer:", ensure_venv(build))
