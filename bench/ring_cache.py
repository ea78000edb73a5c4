"""Ring caches of sliding layers, one run: the real Gemma 3 270M (15 of 18 layers sliding, W = 512;
--weights auto, tp 1, batch 1, --max-context 32768) built twice, its sliding layers' caches as rings
(the default) and as whole rows; each loaded in its own process: the KV cache's bytes, the process's
resident memory, a ~3,000-token prompt's first token and the next 64 tokens' per-token time, and
whether the two answer the same tokens.

    .venv/bin/python -m bench.ring_cache     # ~10 minutes
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import table, write_results

MAX_CONTEXT = 32768
NEW = 64


def measure(shards: str) -> dict:
    """In this process: load, prefill the long prompt, decode NEW tokens greedily."""
    import torch

    from bench.generation import QUALITY_TEXT
    from tracer.engine.generator import Generator, SamplingParams

    torch.set_num_threads(2)
    generator = Generator(shards)
    generator.warm_up()
    manifest = json.loads((Path(shards) / "manifest.json").read_text())
    kv = sum(torch.Size(s["shape"]).numel() * 4 for s in manifest["runtime_states"].values())
    prompt = generator.encode(QUALITY_TEXT.read_text() * 12)[:3000]
    times = []
    start = time.perf_counter()
    done = generator.generate([prompt], SamplingParams(max_new_tokens=NEW, prompt_lookup=False),
                              on_token=lambda *_: times.append(time.perf_counter()))[0]
    gaps = sorted(b - a for a, b in zip(times, times[1:], strict=False))
    rss = {k: int(v.split()[0]) / 1024 for k, v in (line.split(":") for line in open("/proc/self/status"))
           if k in ("VmRSS", "VmHWM")}
    generator.close()
    return {"kv_cache_mb": kv / 2**20, "rss_mb": rss["VmRSS"], "peak_rss_mb": rss["VmHWM"],
            "first_token_ms": (times[0] - start) * 1e3, "per_token_ms": gaps[len(gaps) // 2] * 1e3,
            "prompt_tokens": len(prompt), "tokens": done.token_ids}


def main() -> None:
    from bench.gemma3 import gemma3
    from tracer.bucketing import prompt_buckets
    from tracer.builder.decoder_checkpoint import trace_decoder

    _, directory, _ = gemma3()
    config = json.loads((directory / "config.json").read_text())
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, ring in (("ring", True), ("whole rows", False)):
            shards = Path(tmp) / name.replace(" ", "-")
            # the same graphs both ways: prompt buckets of up to 512 tokens (longer prompts in pieces)
            buckets = [n for n in prompt_buckets(MAX_CONTEXT) if n <= 512]
            trace_decoder(directory, config, 1, shards, prefill=buckets, max_context=MAX_CONTEXT, batch_size=1,
                          weights="auto", ring_caches=ring)
            out = subprocess.run([sys.executable, "-m", "bench.ring_cache", "--measure", str(shards)],
                                 capture_output=True, text=True, check=True)
            results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    same = results["ring"]["tokens"] == results["whole rows"]["tokens"]
    rows = [[name, f"{r['kv_cache_mb']:.0f}", f"{r['rss_mb']:.0f}", f"{r['peak_rss_mb']:.0f}",
             f"{r['first_token_ms']:.0f}", f"{r['per_token_ms']:.2f}"] for name, r in results.items()]
    print(table(["sliding layers' cache", "KV cache MiB", "RSS MiB", "peak RSS MiB",
                 f"first token ({results['ring']['prompt_tokens']} tokens), ms", "per token, ms"], rows))
    print(f"same {NEW} greedy tokens: {same}")
    print(write_results("ring_cache", [{"system": k, **{f: v for f, v in r.items() if f != "tokens"}}
                                       for k, r in results.items()], same_tokens=same, max_context=MAX_CONTEXT))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--measure"]:
        print(json.dumps(measure(sys.argv[2])))
    else:
        main()
