"""Token generation with a traced decoder (tracer/models/decoder.py): prefill each prompt into its own
cache row, then generate one token per row per step, all rows of a batch together.

Rows are independent: each has its cache row (slot), its positions and its own seeded sampler, so a
row's tokens equal running that prompt alone. Rows that finish stop costing: idle rows of a step
point at the scratch cache row. Greedy (temperature 0) picks the arg-max, as Hugging Face's
generate(do_sample=False) does.
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
from ..runtime.tensor_parallel_model import parallel_model_load

WARM_UP_PROMPTS_UP_TO = 256  # tokens; longer prompt graphs warm up on their first requests (warm_up)


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0     # 0: greedy
    top_k: int = 0               # 0: no limit
    top_p: float = 1.0
    seed: int | None = None      # None: a random seed
    stop: list[str] = field(default_factory=list)

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


@dataclass
class Completion:
    token_ids: list[int]         # generated tokens only (an end-of-sequence token is not included)
    finish_reason: str           # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int
    text: str | None = None      # with a tokenizer: the decoded tokens, cut before a stop string


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


class Generator:
    def __init__(self, model_dir, tp_degree: int | None = None, executor: str = "threads",
                 threads_per_rank: int | None = None, device: str = "cpu") -> None:
        """executor and device as parallel_model_load's (device="cuda": executor "processes" or
        "torchrun"); the KV caches stay with the ranks."""
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
        self.tokenizer = None
        if tokenizer_file(model_dir).is_file():
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir / TOKENIZER_DIR))

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
        limit = min(self.prefill_buckets[-1], self.max_context - 1)
        if len(prompt) > limit:
            raise GenerationRequestError(f"the prompt has {len(prompt)} tokens; the limit is {limit}", status=413)
        if len(prompt) + params.max_new_tokens > self.max_context:
            raise GenerationRequestError(
                f"prompt ({len(prompt)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the model's "
                f"max context of {self.max_context} tokens")

    # ---- generation --------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 on_token: Callable[[int, int | None, Completion | None], None] | None = None) -> list[Completion]:
        """Completions in prompt order. on_token(prompt index, the new token or None (EOS), the
        completion once that row finished) is called as tokens are produced (streaming)."""
        params = params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        for prompt, p in zip(prompts, params, strict=True):
            self.check(prompt, p)
        results: list[Completion | None] = [None] * len(prompts)
        for start in range(0, len(prompts), self.max_batch):
            rows = [_Row(i, prompts[i], params[i], slot, self._sampler(params[i].seed))
                    for slot, i in enumerate(range(start, min(start + self.max_batch, len(prompts))))]
            for row in rows:
                self._take(row, self._prefill(row), on_token)
            while active := [r for r in rows if r.finish is None]:
                logits = self._step(active)
                for row, row_logits in zip(active, logits, strict=True):
                    self._take(row, row_logits, on_token)
            for row in rows:
                results[row.index] = self._completion(row)
        return results

    def teacher_forced(self, prompt: list[int], tokens: list[int]) -> tuple[list[int], list[float]]:
        """Feed `tokens` after `prompt` one at a time (teacher forcing) and return, for each of them,
        the model's top-1 prediction and the log-probability it gave that token (quality checks:
        top-1 agreement and perplexity between weight formats)."""
        self.check(prompt, SamplingParams(max_new_tokens=max(1, len(tokens))))
        row = _Row(0, prompt, SamplingParams(), 0, self._sampler(0))
        logits = self._prefill(row)
        top1, logprobs = [], []
        for token in tokens:
            top1.append(_argmax(logits))
            logprobs.append(float(torch.log_softmax(logits.float(), -1)[token]))
            row.generated.append(token)
            logits = self._step([row])[0]
        return top1, logprobs

    @staticmethod
    def _sampler(seed: int | None) -> torch.Generator:
        return torch.Generator().manual_seed(seed if seed is not None else random.getrandbits(63))

    def _prefill(self, row: _Row) -> torch.Tensor:
        n = len(row.prompt)
        if n == 1:  # one token: a generation step for this row alone
            return self._step([row], first=True)[0]
        bucket = self.buckets.prefill_bucket(n)
        length = self.prefill_buckets[bucket]  # padded on the right with token 0 at the next positions
        ids = torch.tensor([row.prompt + [0] * (length - n)])
        inputs = [ids, torch.arange(length).unsqueeze(0), torch.tensor([row.slot]), torch.tensor([n - 1])]
        return self.model.run_bucket(bucket, inputs)[0][0]

    def _step(self, rows: list[_Row], first: bool = False) -> list[torch.Tensor]:
        b = next(n for n in self.rows if n >= len(rows))  # the smallest graph that holds them
        # the full graph: each row at its own slot (without tpserve's attention op, llama.py reads cache row i
        # for row i there); a smaller one: the rows first, each reading and writing cache row slots[i]
        at = [row.slot for row in rows] if b == self.max_batch else list(range(len(rows)))
        ids, positions, slots = [[0]] * b, [[0]] * b, [self.scratch] * b  # the graph's other rows: the scratch row
        for i, row in zip(at, rows, strict=True):
            ids[i] = [row.prompt[0] if first else row.generated[-1]]
            positions[i] = [len(row.prompt) + len(row.generated) - 1]  # where that token sits
            slots[i] = row.slot
        bucket = self.buckets.generation_bucket(b, max(p for (p,) in positions) + 1)
        inputs = [torch.tensor(ids), torch.tensor(positions), torch.tensor(slots), torch.zeros(b, dtype=torch.long)]
        logits = self.model.run_bucket(bucket, inputs)[0]
        return [logits[i] for i in at]

    def _take(self, row: _Row, logits: torch.Tensor, on_token) -> None:
        token, appended = self._sample(logits, row), None
        p = row.params
        if token in self.eos:
            row.finish = "stop"
        else:
            row.generated.append(token)
            appended = token
            if p.stop and self.tokenizer is not None:
                text = self.tokenizer.decode(row.generated, skip_special_tokens=True)
                hits = [text.find(s) for s in p.stop if s in text]
                if hits:
                    row.finish, row.text = "stop", text[: min(hits)]
            if row.finish is None and (len(row.generated) >= p.max_new_tokens
                                       or len(row.prompt) + len(row.generated) >= self.max_context):
                row.finish = "length"
        if on_token is not None:
            on_token(row.index, appended, self._completion(row) if row.finish else None)

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
        return Completion(list(row.generated), row.finish or "length", len(row.prompt), text)

    def close(self) -> None:
        self.model.close()


def _argmax(logits: torch.Tensor) -> int:
    """The first index of the largest logit. numpy's on CPU: torch's CPU argmax over SmolLM2's 49152
    logits took 74 us here, numpy's 3 (a 4-row step paid it 4 times); the same first-of-ties rule."""
    return int(logits.float().numpy().argmax()) if logits.device.type == "cpu" else int(logits.argmax())
