"""Continuous batching: requests join a running batch between generation steps and leave it when
they finish or their client goes away (tracer/engine/generator.py runs whole batches instead).

Each request holds one cache row while it runs; join() prefills its prompt into a free row and takes
its first token, step() gives every running request its next token with one call of the model. A
request's tokens equal running its prompt alone: its own cache row, positions and seeded sampler.

With `chunk` (tokens), a prompt is prefilled that many tokens at a time, one piece at join() and one
per step() after it, so a long prompt delays each step of the running requests by one piece's prefill
instead of stalling them for all of it (where the model has chunk graphs: generator.chunk_lengths).
"""

from __future__ import annotations

from collections.abc import Hashable

from ..errors import GenerationRequestError
from .generator import Completion, Generator, SamplingParams, _Row


class RunningBatch:
    def __init__(self, generator: Generator, chunk: int | None = None) -> None:
        self.generator = generator
        self.chunk = chunk if generator.chunk_lengths else None
        self.rows: dict[Hashable, _Row] = {}
        self.prefilled: dict[Hashable, int] = {}  # requests whose prompt is not all in the cache yet

    def join(self, key: Hashable, prompt: list[int], params: SamplingParams) -> _Row:
        """Prefill `prompt` into a free cache row (the one holding most of its beginning: only the rest
        is prefilled) and take its first token. GenerationRequestError for a request the model cannot run
        or when every row is taken (TorchServe's batchSize is the number of rows, so that means a
        misconfigured server)."""
        self.generator.check(prompt, params)
        if key in self.rows:
            raise ValueError(f"request {key!r} is already running")
        if not self.generator.prefix.free:
            raise GenerationRequestError(f"all {self.generator.max_batch} cache rows are taken", status=503)
        row = self.generator._row(len(self.rows), prompt, params)
        self.rows[key] = row
        try:
            if self.chunk is None:
                self.generator._take(row, self.generator._prefill(row), None)
            else:
                self.prefilled[key] = row.start
                self._prefill_piece(key)
        except Exception:
            self.leave(key, failed=True)
            raise
        return row

    def prefilling(self, key: Hashable) -> bool:
        """Whether the request's prompt is still being prefilled (no token yet)."""
        return key in self.prefilled

    def _prefill_piece(self, key: Hashable) -> None:
        row = self.rows[key]
        logits, self.prefilled[key] = self.generator.prefill_chunk(row, self.prefilled[key], self.chunk)
        if self.prefilled[key] == len(row.prompt):
            del self.prefilled[key]
            self.generator._take(row, logits, None)

    def step(self, keys: list[Hashable]) -> None:
        """One new token for each of these requests that has not finished, in one model call; a request
        still prefilling gets its prompt's next piece instead (and its first token with the last)."""
        rows = [self.rows[key] for key in keys if self.rows[key].finish is None and key not in self.prefilled]
        for key in [key for key in keys if key in self.prefilled]:
            self._prefill_piece(key)
        if rows:
            self.generator.advance(rows)

    def completion(self, key: Hashable) -> Completion:
        return self.generator._completion(self.rows[key])

    def leave(self, key: Hashable, failed: bool = False) -> None:
        """The request is done (finished, failed or its client went away): its cache row is free, and
        keeps its tokens' KV for a later prompt that begins with them (not after a failure: unknown)."""
        row = self.rows.pop(key)
        done = self.prefilled.pop(key, None)  # left while prefilling: the pieces so far are held
        held = [] if failed else row.prompt[:done] if done is not None else row.held()
        self.generator.prefix.release(row.slot, held, row.written)
