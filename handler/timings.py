"""Where a served request's time goes, measured inside the worker (bench/serving.py's breakdown table).

Off unless the worker's environment has TPSERVE_TIMINGS=FILE; then each batch appends one JSON line
per request to FILE: the request's id (the client's X-Request-Id header, else TorchServe's), the
wall-clock times at which the handler started and finished the batch (the client subtracts them
from its own send and receive times: the frontend, the queue and the IPC on either side), the
batch's size, and seconds spent per phase: this request's own (parse, tokenize, serialize) and the
batch's shared ones (build: padding the sub-batches; model: the traced graphs, per bucket).
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

from handler.request_parsing import header

ENV = "TPSERVE_TIMINGS"


class Timings:
    def __init__(self) -> None:
        self.path = os.environ.get(ENV) or None
        self.begin(0)

    def around(self, handle, data, context):
        """handle(data, context) (a handler's BaseHandler.handle) with this batch's timings around it."""
        self.begin(len(data))
        answers = handle(data, context)
        self.write(context)
        return answers

    def begin(self, size: int) -> None:
        self.started = time.time()
        self.own: list[dict[str, float]] = [defaultdict(float) for _ in range(size)]
        self.shared: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str, idx: int | None = None) -> Iterator[None]:
        """Time a phase of request idx, or of the whole batch (idx None)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            target = self.shared if idx is None else self.own[idx]
            target[name] += time.perf_counter() - start

    def write(self, context) -> None:
        if self.path is None:
            return
        finished, size = time.time(), len(self.own)
        lines = []
        for idx, own in enumerate(self.own):
            request_id = header(context, idx, "X-Request-Id") or context.get_request_id(idx)
            lines.append(json.dumps({"id": request_id, "start": self.started, "end": finished, "batch": size,
                                     "own": own, "shared": self.shared}))
        with open(self.path, "a") as out:  # one write per batch: lines of concurrent workers do not interleave
            out.write("\n".join(lines) + "\n")
