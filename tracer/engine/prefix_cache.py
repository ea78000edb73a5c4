"""Prefix caching by cache row, as llama.cpp's server reuses a slot's previous prompt: each row of the KV
cache remembers the tokens whose keys and values it still holds once its request has finished, and a
new request takes the free row that holds the longest beginning of its prompt, so only the rest is
prefilled (tracer/engine/generator.py's chunked prefill).

Why rows and not vLLM's hashed blocks: the cache is one contiguous run of positions per row (what
tpserve::cached_attention and SDPA read without a gather), so a reused prefix must already sit at
positions 0.. of the row the request runs in; a chat's next turn, a shared system prompt or the same
document asked again all are such prefixes. The memory is the cache's own (max_batch rows of
max_context positions, allocated at load): nothing more is held, and a row's prefix lives until a
request that shares less of it needs the row (least recently used first).

Sliding layers with a ring cache (models/decoder.py's DecoderConfig.ring) hold only their last R
positions: a prefix of k tokens is reusable from a row only while its ring still holds the W - 1
positions before k (the ones the first new token attends), i.e. none written since then wrapped over them.
"""

from __future__ import annotations

# A free row that shares at least this fraction of its held tokens or of the new prompt is that
# conversation's (or that document's) row: the request takes it. Otherwise the least recently used free
# row is taken (and what it shares, if anything, is reused), so a short common system prompt does not
# evict another chat's long history that a later turn would reuse (llama.cpp's slot_prompt_similarity,
# 0.5 by default there).
SAME_CONVERSATION = 0.5


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PrefixCache:
    def __init__(self, rows: int, enabled: bool = True, rings: list[tuple[int, int]] = ()) -> None:
        self.enabled = enabled
        self.rings = list(rings)  # (window W, ring R) of each kind of ring-cached sliding layer
        self.held: list[list[int]] = [[] for _ in range(rows)]  # tokens whose KV row r holds at 0..
        self.written = [-1] * rows  # the last position written in row r (its rings hold the R before)
        self.last_used = [0] * rows
        self.free = set(range(rows))
        self.clock = 0
        self.prompt_tokens = 0  # counters: tokens of the prompts taken, and of those read from the cache
        self.cached_tokens = 0

    def acquire(self, prompt: list[int]) -> tuple[int, int]:
        """(a free row for this prompt, how many of its first tokens that row already holds). At least
        the prompt's last token is always prefilled (its logits give the first new token)."""
        if not self.free:
            raise LookupError("every cache row is taken")
        shared = {row: self._usable(row, min(common_prefix(self.held[row], prompt), len(prompt) - 1))
                  if self.enabled else 0 for row in self.free}
        lru = min(self.free, key=lambda row: self.last_used[row])
        same = [row for row in self.free
                if shared[row] and shared[row] >= SAME_CONVERSATION * min(len(self.held[row]), len(prompt))]
        row = max(same, key=lambda r: (shared[r], -self.last_used[r])) if same else lru
        reused = min(shared[row], len(prompt) - 1)
        self.free.discard(row)
        self.held[row] = []  # being written: nothing is known to be held until release
        self.prompt_tokens += len(prompt)
        self.cached_tokens += reused
        return row, reused

    def _usable(self, row: int, start: int) -> int:
        """`start` (tokens reused) if the row's rings still hold the positions its first new token
        attends, else 0."""
        return start if all(max(0, start - window + 1) > self.written[row] - ring
                            for window, ring in self.rings) else 0

    def release(self, row: int, held: list[int], written: int = -1) -> None:
        """The request running in `row` is done; the row holds the KV of `held` (its prompt and the
        generated tokens that were fed back) at positions 0.., and its last write was at `written`
        (bucket padding included: what rings hold)."""
        self.clock += 1
        self.held[row] = list(held) if self.enabled else []
        self.written[row] = written
        self.last_used[row] = self.clock
        self.free.add(row)

    def clear(self) -> None:
        """Forget every held prefix (free rows only hold them)."""
        for row in self.free:
            self.held[row] = []
