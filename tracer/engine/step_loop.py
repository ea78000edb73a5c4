"""Continuous batching as a loop of its own: the generation loop a serving worker runs when it owns
it (handler/async_generation_handler.py, TorchServe's async mode), instead of one handler call per
step. run() runs it on the caller's thread (the one that loaded the model) until close().

Requests are submitted from any thread; the loop takes them in at the next step boundary (into a free
cache row, else they wait in arrival order), prefills them in pieces between steps (RunningBatch's
chunk), and after every join and every step tells each request what it has now through its callback,
on the loop's thread: `on_step(row, error)` (the row with its tokens so far; error: the exception
that ended it). A request is done when its row has a finish reason or it got an error; the loop then
frees its row. A request can fail only itself: an error in its join ends it alone; a model error in
a step ends the rows of that step (as a whole batch's failure would), and the loop goes on.
"""

from __future__ import annotations

import collections
import logging
import queue
from collections.abc import Callable, Hashable

from ..errors import last_line
from .generator import SamplingParams, _Row
from .running_batch import RunningBatch

logger = logging.getLogger(__name__)

OnStep = Callable[[_Row | None, Exception | None], None]


class StepLoop:
    def __init__(self, batch: RunningBatch) -> None:
        self.batch = batch
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.waiting: collections.deque = collections.deque()  # submitted, no free cache row yet
        self.callbacks: dict[Hashable, OnStep] = {}

    def submit(self, key: Hashable, prompt: list[int], params: SamplingParams, on_step: OnStep) -> None:
        """From any thread: the request joins at the next step boundary."""
        self.inbox.put((key, prompt, params, on_step))

    def close(self) -> None:
        """From any thread: run() returns at the next step boundary."""
        self.inbox.put(None)

    # ---- the loop's thread ----------------------------------------------------------------------
    def run(self) -> None:
        """The loop, until close(). Run it on the thread that ran the model so far (the one that loaded
        and warmed it): OpenMP keeps a team of threads per thread that ran a parallel region, and a
        second team, even idle, slowed every step here 2.5x (SmolLM2 int4: 6.5 -> 16.6 ms a token; with
        more threads than cores libgomp stops spinning and wakes its threads for each region)."""
        while True:
            idle = not self.batch.rows and not self.waiting
            if not self._take_inbox(block=idle):
                return
            while self.waiting and self.batch.generator.prefix.free:
                self._join(*self.waiting.popleft())
            if self.batch.rows:
                self._step()

    def _take_inbox(self, block: bool) -> bool:
        """Move what was submitted meanwhile into the waiting line (waiting for it when idle); False
        once close() was called."""
        while True:
            try:
                item = self.inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if item is None:
                return False
            self.waiting.append(item)

    def _join(self, key: Hashable, prompt: list[int], params: SamplingParams, on_step: OnStep) -> None:
        try:
            row = self.batch.join(key, prompt, params)
        except Exception as exc:  # noqa: BLE001 - a request can fail only itself
            self._call(on_step, None, exc)
            return
        self.callbacks[key] = on_step
        self._report(key, row)

    def _step(self) -> None:
        keys = list(self.batch.rows)
        try:
            self.batch.step(keys)
        except Exception as exc:  # noqa: BLE001 - the rows of this step fail, the loop goes on
            logger.error("tpserve: a generation step failed: %s", last_line(exc))
            for key in keys:
                on_step = self.callbacks.get(key)
                self._leave(key, failed=True)
                if on_step is not None:
                    self._call(on_step, None, exc)
            return
        for key in keys:
            if key in self.batch.rows:
                self._report(key, self.batch.rows[key])

    def _report(self, key: Hashable, row: _Row) -> None:
        self._call(self.callbacks[key], row, None)
        if row.finish is not None:
            self._leave(key)

    def _leave(self, key: Hashable, failed: bool = False) -> None:
        self.callbacks.pop(key, None)
        if key in self.batch.rows:
            self.batch.leave(key, failed=failed)

    @staticmethod
    def _call(on_step: OnStep, row: _Row | None, error: Exception | None) -> None:
        try:
            on_step(row, error)
        except Exception:  # noqa: BLE001 - an answer that cannot be written must not stop the loop
            logger.exception("tpserve: answering a request failed")
