"""Shared benchmark helpers: medians after warm-up, markdown rows, a keep-alive HTTP client."""

import http.client
import statistics
import time


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
