"""Token generation with a traced decoder (tracer/models/decoder.py): prefill each prompt into its own
cache row, then generate one token per row per step, all rows of a batch together.

Rows are independent: each has its cache row (slot), its positions and its own seeded sampler, so a
row's tokens equal running that prompt alone. Rows that finish stop costing: idle rows of a step point
at the scratch cache row. Greedy (temperature 0) picks the arg-max, as Hugging Face's
generate(do_sample=False) does.

A finished row's cache row keeps its tokens' keys and values for the next prompt that begins with them
(tracer/engine/prefix_cache.py): that prompt prefills only the rest, in chunks through the prompt graphs
that attend the cached positions before them. A greedy row whose last 3 tokens occurred earlier drafts
what followed them and verifies the drafts in one call (prompt-lookup decoding). Rows may be constrained
by a grammar (tracer/engine/grammar.py) and report their tokens' log-probabilities.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..artifacts import TOKENIZER_DIR, tokenizer_file
from ..bucketing import DecoderBucketKernel
from ..errors import GenerationRequestError, ManifestError
from ..models.decoder import DecoderConfig
from ..runtime.tensor_parallel_model import parallel_model_load
from .grammar import Constraint, Grammars
from .prefix_cache import PrefixCache

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs (vLLM's default too)
WARM_UP_PROMPTS_UP_TO = 256
# prompt-lookup decoding matches the context's last 3 tokens earlier in it (also trying the last 2
# found the copy sooner after a change but drafted more that was refused: SmolLM2 int4 editing a
# passage went 0.95x -> 1.05x plain decoding's time a token; bench.prompt_lookup)
LOOKUP_NGRAMS = (3,)  # tokens; longer prompt graphs warm up on their first requests (warm_up)


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0     # 0: greedy
    top_k: int = 0               # 0: no limit
    top_p: float = 1.0
    seed: int | None = None      # None: a random seed
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: none; k: each token's log-probability and the k likeliest (k <= 20)
    grammar: object | None = None  # a compiled grammar (generator.grammars): the tokens follow it
    prompt_lookup: bool | None = None  # draft tokens from the context (greedy only); None: the generator's default

    def check(self) -> None:
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            raise GenerationRequestError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature <= 100:
            raise GenerationRequestError(f"temperature must be a number in [0, 100], got {self.temperature!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise GenerationRequestError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise GenerationRequestError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise GenerationRequestError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise GenerationRequestError("stop must be a list of non-empty strings")
        if self.prompt_lookup not in (None, True, False):
            raise GenerationRequestError(f"prompt_lookup must be true or false, got {self.prompt_lookup!r}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or isinstance(self.logprobs, bool)
                                          or not 0 <= self.logprobs <= MAX_TOP_LOGPROBS):
            raise GenerationRequestError(
                f"top logprobs must be an integer in 0..{MAX_TOP_LOGPROBS}, got {self.logprobs!r}")


@dataclass
class Completion:
    token_ids: list[int]         # generated tokens only (an end-of-sequence token is not included)
    finish_reason: str           # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int
    text: str | None = None      # with a tokenizer: the decoded tokens, cut before a stop string
    cached_tokens: int = 0       # of the prompt's tokens, how many were read from the prefix cache
    logprobs: list[TokenLogprob] | None = None  # per generated token, when asked


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model (log_softmax of its logits, before
    temperature, top-k and top-p: what OpenAI and llama.cpp report) and the `top` likeliest tokens'."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class _Row:
    index: int
    prompt: list[int]
    params: SamplingParams
    slot: int
    sampler: torch.Generator
    generated: list[int] = field(default_factory=list)
    finish: str | None = None
    text: str | None = None
    start: int = 0               # the prompt's first tokens whose KV the row already held (prefix cache)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    constraint: Constraint | None = None
    ngrams: dict = field(default_factory=dict)  # prompt lookup: n tokens -> where the token after them sits
    indexed: int = 0                            # tokens of prompt + generated indexed into ngrams
    written: int = -1  # the last cache position written (bucket padding too): what ring caches still hold

    def held(self) -> list[int]:
        """The tokens whose keys and values this row's cache holds once it stopped: the prompt and
        every generated token but the last (fed back only if another step followed)."""
        return self.prompt + self.generated[:-1]


class Generator:
    def __init__(self, model_dir, tp_degree: int | None = None, executor: str = "threads",
                 threads_per_rank: int | None = None, device: str = "cpu", prefix_caching: bool = True,
                 prefill_piece: int | None = None) -> None:
        """executor and device as parallel_model_load's (device="cuda": executor "processes" or
        "torchrun"); the KV caches stay with the ranks. prefix_caching: reuse a finished row's cached
        prefix (where the model's prompt graphs can start past position 0: built by tpserve >= 0.6 on
        its CPU backend). prefill_piece: the most prompt tokens one call prefills (None: the largest
        chunk graph warm_up runs; 0: a prompt in its own bucket, in one call)."""
        model_dir = Path(model_dir)
        self.model = parallel_model_load(model_dir, tp_degree=tp_degree, executor=executor,
                                         threads_per_rank=threads_per_rank, device=device)
        info = self.model.manifest.model or {}
        if info.get("kind") != "generation":
            self.model.close()
            raise ManifestError(f"{model_dir}: not a generation model built by the offline tracer")
        self.max_batch = info["decoder"]["max_batch"]
        self.max_context = info["decoder"]["max_context"]
        self.prefill_buckets = info["prefill_buckets"]
        self.context_buckets = info["context_buckets"]
        self.rows = info.get("generation_rows", [self.max_batch])  # row counts of the generation graphs
        # the saved bucket kernel's choice, made here in Python (ints the generator already holds): steps
        # run their bucket directly, without a call of the scripted kernel (~0.15 ms a step)
        self.buckets = DecoderBucketKernel(self.prefill_buckets, self.context_buckets, self.rows)
        self.eos = set(info.get("eos_token_ids") or [])
        self.scratch = self.max_batch  # the cache row idle rows write to
        # prompt graphs that attend the whole cache row (context max_context), so they can prefill a chunk
        # at any position after cached ones: on the CPU backend, those of up to 512 tokens (attention by
        # tpserve::cached_attention, whose cost follows the positions, not the context)
        contexts = info.get("prefill_contexts") or self.prefill_buckets
        self.chunk_lengths = [n for n, c in zip(self.prefill_buckets, contexts, strict=True) if c >= self.max_context]
        decoder = DecoderConfig(**info["decoder"])  # sliding layers' ring caches: (window, ring) of each kind
        rings = sorted({(decoder.windows[i], decoder.ring(i)) for i in range(decoder.num_hidden_layers)
                        if decoder.ring(i)})
        self.prefix = PrefixCache(self.max_batch, enabled=prefix_caching and bool(self.chunk_lengths), rings=rings)
        # prompts go in pieces through the chunk graphs warm_up runs, so no request lands in a cold graph
        # (TorchScript profiles a graph's first runs: a 700-token chat took 4.1 s the first time served),
        # and it is not slower: SmolLM2 int4, 700 tokens, 850 ms in 256-token pieces, 848 in 512-token ones,
        # 906 in its 768-token graph (SDPA)
        warm = [n for n in self.chunk_lengths if n <= WARM_UP_PROMPTS_UP_TO] or self.chunk_lengths[-1:]
        self.prefill_piece = (prefill_piece if prefill_piece is not None else warm[-1]) if warm else 0
        # verify graphs: a row's last token and up to n - 1 drafts in one call (prompt-lookup decoding)
        self.verify_tokens = (info.get("verify_tokens") or [0])[0]
        self.verify_bucket = len(self.prefill_buckets) + len(self.rows) * len(self.context_buckets)
        # the default for requests that do not say: on, as free writing was not slower with it (SmolLM2 int4:
        # 0.77x a token, its own text repeating itself; docs/performance.md#prompt-lookup-decoding)
        self.prompt_lookup = True
        self.rope_switch = info.get("rope_switch", 0)  # builder/decoder_checkpoint.py's rope_switch
        self.lookup_stats = {"calls": 0, "drafted": 0, "accepted": 0}
        self.tokenizer = None
        if tokenizer_file(model_dir).is_file():
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir / TOKENIZER_DIR))
        self.grammars = Grammars(self.tokenizer, info["decoder"]["vocab_size"], sorted(self.eos))

    def warm_up(self) -> None:
        """The first runs of a traced graph are slow (TorchScript profiles them): run every graph
        twice, writing only to the scratch cache row. Prompt graphs over WARM_UP_PROMPTS_UP_TO tokens
        are left to their first requests: there the two profiling runs cost ~15 % more than a
        steady one (SmolLM2 fp32, 512 tokens: 1140, 1083, then 963 ms; at 64 tokens 327, 271, then
        136), and warming them was most of a worker's start (SmolLM2 int4, 23 prompt buckets to
        1024 tokens: 46 s)."""
        scratch = torch.full((self.max_batch,), self.scratch, dtype=torch.long)
        for _ in range(2):
            for n in (b for b in self.prefill_buckets if b <= WARM_UP_PROMPTS_UP_TO):
                self.model.run_bucket(self.buckets.prefill_bucket(n), [
                    torch.zeros(1, n, dtype=torch.long), torch.arange(n).unsqueeze(0), scratch[:1],
                    torch.tensor([n - 1])])
            if self.verify_tokens:
                n = self.verify_tokens
                ids, positions = torch.zeros(1, n, dtype=torch.long), torch.arange(n).unsqueeze(0)
                self.model.run_bucket(self.verify_bucket, [ids, positions, scratch[:1], torch.tensor([n - 1])])
            for b in self.rows:
                for context in self.context_buckets:
                    self.model.run_bucket(self.buckets.generation_bucket(b, context), [
                        torch.zeros(b, 1, dtype=torch.long), torch.full((b, 1), context - 1), scratch[:b],
                        torch.zeros(b, dtype=torch.long)])

    # ---- text in, tokens out -------------------------------------------------------------------
    def encode(self, prompt: str | None = None, messages: list[dict] | None = None) -> list[int]:
        """Token ids as the checkpoint's tokenizer makes them by default (chat template for messages)."""
        if self.tokenizer is None:
            raise GenerationRequestError("this model has no tokenizer: send token ids")
        if messages is not None:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        return list(self.tokenizer(prompt)["input_ids"])

    def check(self, prompt: list[int], params: SamplingParams) -> None:
        """GenerationRequestError (status 400 or 413) for a request this model cannot run."""
        params.check()
        if not prompt:
            raise GenerationRequestError("the prompt is empty")
        # past the largest prompt graph in chunks, where chunk graphs exist
        limit = self.max_context - 1 if self.chunk_lengths else min(self.prefill_buckets[-1], self.max_context - 1)
        if len(prompt) > limit:
            raise GenerationRequestError(f"the prompt has {len(prompt)} tokens; the limit is {limit}", status=413)
        if len(prompt) + params.max_new_tokens > self.max_context:
            raise GenerationRequestError(
                f"prompt ({len(prompt)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the model's "
                f"max context of {self.max_context} tokens")

    # ---- generation --------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 on_token: Callable[[int, int | None, Completion | None, TokenLogprob | None], None] | None = None
                 ) -> list[Completion]:
        """Completions in prompt order. on_token(prompt index, the new token or None (EOS), the
        completion once that row finished, the new token's log-probabilities when asked) is called as
        tokens are produced (streaming)."""
        params = params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        for prompt, p in zip(prompts, params, strict=True):
            self.check(prompt, p)
        results: list[Completion | None] = [None] * len(prompts)
        for first in range(0, len(prompts), self.max_batch):
            last = min(first + self.max_batch, len(prompts))
            rows = [self._row(i, prompts[i], params[i]) for i in range(first, last)]
            done = False
            try:
                for row in rows:
                    self._take(row, self._prefill(row), on_token)
                while active := [r for r in rows if r.finish is None]:
                    self.advance(active, on_token)
                done = True
            finally:  # after a failure the rows' contents are not known: nothing is kept
                for row in rows:
                    self.prefix.release(row.slot, row.held() if done else [], row.written)
            for row in rows:
                results[row.index] = self._completion(row)
        return results

    def _row(self, index: int, prompt: list[int], params: SamplingParams) -> _Row:
        """A row for this prompt in a free cache row, the one holding most of its beginning."""
        constraint = Constraint(params.grammar) if params.grammar is not None else None
        slot, start = self.prefix.acquire(prompt)
        return _Row(index, prompt, params, slot, self._sampler(params.seed), start=start, constraint=constraint,
                    written=self.prefix.written[slot] if start else -1)

    def teacher_forced(self, prompt: list[int], tokens: list[int]) -> tuple[list[int], list[float]]:
        """Feed `tokens` after `prompt` one at a time (teacher forcing) and return, for each of them,
        the model's top-1 prediction and the log-probability it gave that token (quality checks:
        top-1 agreement and perplexity between weight formats)."""
        self.check(prompt, SamplingParams(max_new_tokens=max(1, len(tokens))))
        row = self._row(0, prompt, SamplingParams())
        try:
            logits = self._prefill(row)
            top1, logprobs = [], []
            for token in tokens:
                top1.append(_argmax(logits))
                logprobs.append(float(torch.log_softmax(logits.float(), -1)[token]))
                row.generated.append(token)
                logits = self._step([row])[0]
        finally:
            self.prefix.release(row.slot, [])
        return top1, logprobs

    @staticmethod
    def _sampler(seed: int | None) -> torch.Generator:
        return torch.Generator().manual_seed(seed if seed is not None else random.getrandbits(63))

    def _prefill(self, row: _Row) -> torch.Tensor:
        """The logits after the row's prompt, its KV written from row.start on (what the cache does not
        hold): in pieces of prefill_piece tokens, or (0) the whole prompt in its bucket."""
        n, start = len(row.prompt), row.start
        if start == 0 and 1 < n <= self.prefill_buckets[-1] and not self.prefill_piece:
            return self._prefill_whole(row, row.prompt)
        while True:
            logits, start = self.prefill_chunk(row, start, self.prefill_piece or None)
            if start == n:
                return logits

    def _prefill_whole(self, row: _Row, tokens: list[int]) -> torch.Tensor:
        """The logits after `tokens`, prefilled into the row's cache row from position 0 in one call of
        their bucket, however long (SDPA past 512 tokens)."""
        n = len(tokens)
        bucket = self.buckets.prefill_bucket(n)
        length = self.prefill_buckets[bucket]  # padded on the right with token 0 at the next positions
        ids = torch.tensor([tokens + [0] * (length - n)])
        inputs = [ids, torch.arange(length).unsqueeze(0), torch.tensor([row.slot]), torch.tensor([n - 1])]
        row.written = max(row.written, length - 1)
        return self.model.run_bucket(bucket, inputs)[0][0]

    def prefill_chunk(self, row: _Row, start: int, limit: int | None = None) -> tuple[torch.Tensor, int]:
        """Prefill the row's prompt tokens from `start` on, at most one chunk graph's worth (and at most
        `limit` tokens): the logits after the chunk's last token, and where the next chunk starts. The
        bucket's padding sits at the next positions (written, never attended: generation overwrites a
        position before it reads it), the last cache position at most."""
        n = len(row.prompt)
        if n - start == 1:  # one token: a generation step for this row alone
            return self._step([row], first=True)[0], n
        take = min(n - start, self.chunk_lengths[-1], limit or n)
        bucket = self.buckets.prefill_bucket(take)
        length = self.prefill_buckets[bucket]
        ids = torch.tensor([row.prompt[start:start + take] + [0] * (length - take)])
        positions = (torch.arange(start, start + length).clamp(max=self.max_context - 1)).unsqueeze(0)
        inputs = [ids, positions, torch.tensor([row.slot]), torch.tensor([take - 1])]
        row.written = max(row.written, int(positions[0, -1]))
        return self.model.run_bucket(bucket, inputs)[0][0], start + take

    def advance(self, rows: list[_Row], on_token=None) -> None:
        """The next token of each row (one step for them all); a greedy row with prompt lookup whose
        context repeats its last tokens verifies the drafts that followed them instead, in one call of
        its own, and keeps every draft the model agrees with, plus the model's next token."""
        stepped = []
        for row in rows:
            if self._crosses_switch(row):  # Hugging Face recomputes the whole sequence there: so do we
                self._take(row, self._prefill_whole(row, row.prompt + row.generated), on_token)
            elif drafts := self._drafts(row):
                self._verify(row, drafts, on_token)
            else:
                stepped.append(row)
        if stepped:
            for row, logits in zip(stepped, self._step(stepped), strict=True):
                self._take(row, logits, on_token)

    def _crosses_switch(self, row: _Row) -> bool:
        """Whether this step is the row's first past its rotary switch (and a prompt graph holds it all)."""
        at = len(row.prompt) + len(row.generated) - 1  # the position of the token the step feeds
        return bool(self.rope_switch) and at == self.rope_switch and at + 1 <= self.prefill_buckets[-1]

    def _drafts(self, row: _Row) -> list[int]:
        """The tokens that followed the latest earlier occurrence of the row's last LOOKUP_NGRAMS tokens,
        up to what the verify graph, max_new_tokens and the context leave room for."""
        lookup = row.params.prompt_lookup
        if not self.verify_tokens or row.params.temperature != 0 or not (
                self.prompt_lookup if lookup is None else lookup):
            return []
        tokens = row.prompt + row.generated
        for end in range(row.indexed, len(tokens)):  # each n-gram ending before `end`, with a token after it
            for n in LOOKUP_NGRAMS:
                if end >= n:
                    row.ngrams[tuple(tokens[end - n:end])] = end
        row.indexed = max(row.indexed, len(tokens))
        after = next((a for n in LOOKUP_NGRAMS if (a := row.ngrams.get(tuple(tokens[-n:]))) is not None
                      and a < len(tokens)), None)
        if after is None:
            return []
        room = min(self.verify_tokens - 1, row.params.max_new_tokens - len(row.generated) - 1,
                   self.max_context - len(tokens) - 1)
        return tokens[after:after + room] if room > 0 else []

    def _verify(self, row: _Row, drafts: list[int], on_token) -> None:
        n, at = self.verify_tokens, len(row.prompt) + len(row.generated) - 1  # the last token's position
        ids = [row.generated[-1], *drafts] + [0] * (n - 1 - len(drafts))
        positions = torch.arange(at, at + n).clamp(max=self.max_context - 1).unsqueeze(0)
        row.written = max(row.written, int(positions[0, -1]))
        logits = self.model.run_bucket(self.verify_bucket, [
            torch.tensor([ids]), positions, torch.tensor([row.slot]), torch.tensor([len(drafts)])])[0]
        self.lookup_stats["calls"] += 1
        self.lookup_stats["drafted"] += len(drafts)
        for i in range(len(drafts) + 1):  # position i's logits follow drafts[:i]: valid while they agreed
            self._take(row, logits[i], on_token)
            if row.finish is not None or i == len(drafts) or row.generated[-1] != drafts[i]:
                break
            self.lookup_stats["accepted"] += 1

    def _step(self, rows: list[_Row], first: bool = False) -> list[torch.Tensor]:
        b = next(n for n in self.rows if n >= len(rows))  # the smallest graph that holds them
        # the full graph: each row at its own slot (without tpserve's attention op, llama.py reads cache row i
        # for row i there); a smaller one: the rows first, each reading and writing cache row slots[i]
        at = [row.slot for row in rows] if b == self.max_batch else list(range(len(rows)))
        ids, positions, slots = [[0]] * b, [[0]] * b, [self.scratch] * b  # the graph's other rows: the scratch row
        for i, row in zip(at, rows, strict=True):
            ids[i] = [row.prompt[-1] if first else row.generated[-1]]
            positions[i] = [len(row.prompt) + len(row.generated) - 1]  # where that token sits
            slots[i] = row.slot
            row.written = max(row.written, positions[i][0])
        bucket = self.buckets.generation_bucket(b, max(p for (p,) in positions) + 1)
        inputs = [torch.tensor(ids), torch.tensor(positions), torch.tensor(slots), torch.zeros(b, dtype=torch.long)]
        logits = self.model.run_bucket(bucket, inputs)[0]
        return [logits[i] for i in at]

    def _take(self, row: _Row, logits: torch.Tensor, on_token) -> None:
        raw = logits  # logprobs are the model's, before the grammar's mask and the sampling settings
        if row.constraint is not None:
            logits = row.constraint.masked(logits)
        token, appended, logprob = self._sample(logits, row), None, None
        if row.constraint is not None:
            row.constraint.accept(token)
        p = row.params
        if token in self.eos:
            row.finish = "stop"
        else:
            row.generated.append(token)
            appended = token
            if p.logprobs is not None:
                logprob = _logprob(raw, token, p.logprobs)
                row.logprobs.append(logprob)
            if p.stop and self.tokenizer is not None:
                text = self.tokenizer.decode(row.generated, skip_special_tokens=True)
                hits = [text.find(s) for s in p.stop if s in text]
                if hits:
                    row.finish, row.text = "stop", text[: min(hits)]
            if row.finish is None and (len(row.generated) >= p.max_new_tokens
                                       or len(row.prompt) + len(row.generated) >= self.max_context):
                row.finish = "length"
        if on_token is not None:
            on_token(row.index, appended, self._completion(row) if row.finish else None, logprob)

    @staticmethod
    def _sample(logits: torch.Tensor, row: _Row) -> int:
        p = row.params
        if p.temperature == 0:
            return _argmax(logits)
        logits = logits.float().cpu()  # the row's seeded generator is a CPU one
        logits = logits / p.temperature
        if p.top_k:
            kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1:
            sorted_logits, order = logits.sort(descending=True)
            probs = sorted_logits.softmax(-1)
            drop = probs.cumsum(-1) - probs > p.top_p  # keep the smallest set reaching top_p
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
        return int(torch.multinomial(logits.softmax(-1), 1, generator=row.sampler))

    def _completion(self, row: _Row) -> Completion:
        text = row.text
        if text is None and self.tokenizer is not None:
            text = self.tokenizer.decode(row.generated, skip_special_tokens=True)
        return Completion(list(row.generated), row.finish or "length", len(row.prompt), text, row.start,
                          list(row.logprobs) if row.params.logprobs is not None else None)

    def close(self) -> None:
        self.model.close()


def _logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """One log_softmax over the vocabulary (~0.1 ms for SmolLM2's 49152: paid only when asked)."""
    logprobs = torch.log_softmax(logits.float().cpu(), -1)
    best = torch.topk(logprobs, top) if top else None
    return TokenLogprob(token, float(logprobs[token]),
                        list(zip(best.indices.tolist(), best.values.tolist(), strict=True)) if best else [])


def _argmax(logits: torch.Tensor) -> int:
    """The first index of the largest logit. numpy's on CPU: torch's CPU argmax over SmolLM2's 49152
    logits took 74 us here, numpy's 3 (a 4-row step paid it 4 times); the same first-of-ties rule."""
    return int(logits.float().numpy().argmax()) if logits.device.type == "cpu" else int(logits.argmax())
