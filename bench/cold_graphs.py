"""The first request of every prompt bucket, against the second, one run: SmolLM2 int4 as `make serve`
builds it (tp 1, max context 1024), loaded and warmed as a worker is (Generator.warm_up), prefix
caching off (each prompt prefilled whole, in the generator's pieces); for each prompt bucket a prompt
of that length, sent twice with different tokens: the first token's time each time.

    .venv/bin/python -m bench.cold_graphs      # ~3 minutes
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import table, write_results


def main() -> None:
    import torch

    from tracer.engine.generator import Generator, SamplingParams

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        subprocess.run([sys.executable, "-m", "tracer", "build", "--model", "smollm2", "--tp-degree", "1",
                        "--weights", "int4", "--model-name", "smollm2", "--export-path", tmp,
                        "--archive-format", "no-archive"], check=True, capture_output=True)
        generator = Generator(Path(tmp) / "smollm2.shards", prefix_caching=False)
        generator.warm_up()
        rows = []
        try:
            for n in generator.prefill_buckets:
                if n >= generator.max_context:
                    continue
                times = []
                for offset in (0, 7):
                    prompt = [(13 * i + offset) % 40000 + 100 for i in range(n)]
                    start = time.perf_counter()
                    generator.generate([prompt], SamplingParams(max_new_tokens=1))
                    times.append((time.perf_counter() - start) * 1000)
                rows.append({"prompt_tokens": n, "first_ms": times[0], "second_ms": times[1],
                             "first_over_second": times[0] / times[1]})
        finally:
            generator.close()
    print(table(["prompt tokens", "first request ms", "second ms", "first / second"],
                [[r["prompt_tokens"], f"{r['first_ms']:.0f}", f"{r['second_ms']:.0f}",
                  f"{r['first_over_second']:.2f}"] for r in rows]))
    print("wrote", write_results("cold_graphs", rows))


if __name__ == "__main__":
    main()
