"""Shared benchmark helpers: medians after warm-up, markdown rows, a keep-alive HTTP client."""

import http.client
import os
import platform
import statistics
import time
from pathlib import Path


def median_ms(fn, runs: int = 50, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def http_session(port: int, path: str, body_of):
    """make() opens one keep-alive connection to 127.0.0.1:port and returns send(text, request_id),
    which POSTs body_of(text) -> (content type, bytes) to `path` and returns the answer's bytes."""
    def make():
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

        def send(text: str, request_id: str) -> bytes:
            content_type, body = body_of(text)
            connection.request("POST", path, body=body, headers={"Content-Type": content_type,
                                                                 "X-Request-Id": request_id})
            response = connection.getresponse()
            answer = response.read()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {answer[:200]!r}")
            return answer
        return send
    return make


def machine() -> str:
    """The CPU the numbers come from (this project's machines change between runs: AVX2 only, AMD Zen 4,
    Intel with AVX-512; tpserve's kernels take the widest vectors the CPU has)."""
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    vectors = "AVX-512" if "avx512f" in flags else ("AVX2" if "avx2" in flags else "no AVX2")
    return f"{model}, {os.cpu_count()} cores, {vectors}"


def commit() -> str:
    """The checked-out commit (with '+dirty' where the tree has changes), or 'unknown'."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


RESULTS = Path(__file__).parent / "results"


def write_results(name: str, rows: list[dict], directory: Path = RESULTS, **extra) -> str:
    """DIRECTORY/NAME.json (bench/results/ by default): the machine, the date, the commit and the rows
    (what bench.plots draws)."""
    import datetime
    import json

    path = Path(directory) / f"{name}.json"
    path.parent.mkdir(exist_ok=True)
    record = {"benchmark": name, "machine": machine(), "date": datetime.datetime.now(datetime.UTC).isoformat(
        timespec="seconds"), "commit": commit(), **extra, "rows": rows}
    path.write_text(json.dumps(record, indent=1) + "\n")
    return str(path)
