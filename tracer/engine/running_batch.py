"""Continuous batching: requests join a running batch between generation steps and leave it when
they finish or their client goes away (tracer/engine/generator.py runs whole batches instead).

Each request holds one cache row while it runs; join() prefills its prompt into a free row and takes
its first token, step() gives every running request its next token with one call of the model. A
request's tokens equal running its prompt alone: its own cache row, positions and seeded sampler.
"""

from __future__ import annotations

from collections.abc import Hashable

from ..errors import GenerationRequestError
from .generator import Completion, Generator, SamplingParams, _Row


class RunningBatch:
    def __init__(self, generator: Generator) -> None:
        self.generator = generator
        self.free = list(reversed(range(generator.max_batch)))  # cache rows nobody holds
        self.rows: dict[Hashable, _Row] = {}

    def join(self, key: Hashable, prompt: list[int], params: SamplingParams) -> _Row:
        """Prefill `prompt` into a free cache row and take its first token. GenerationRequestError
        for a request the model cannot run or when every row is taken (TorchServe's batchSize is the
        number of rows, so that means a misconfigured server)."""
        self.generator.check(prompt, params)
        if key in self.rows:
            raise ValueError(f"request {key!r} is already running")
        if not self.free:
            raise GenerationRequestError(f"all {self.generator.max_batch} cache rows are taken", status=503)
        row = _Row(len(self.rows), prompt, params, self.free.pop(), self.generator._sampler(params.seed))
        self.rows[key] = row
        try:
            self.generator._take(row, self.generator._prefill(row), None)
        except Exception:
            self.leave(key)
            raise
        return row

    def step(self, keys: list[Hashable]) -> None:
        """One new token for each of these requests that has not finished, in one model call."""
        rows = [self.rows[key] for key in keys if self.rows[key].finish is None]
        if rows:
            for row, logits in zip(rows, self.generator._step(rows), strict=True):
                self.generator._take(row, logits, None)

    def completion(self, key: Hashable) -> Completion:
        return self.generator._completion(self.rows[key])

    def leave(self, key: Hashable) -> None:
        """The request is done (finished, failed or its client went away): its cache row is free."""
        row = self.rows.pop(key)
        self.free.append(row.slot)
