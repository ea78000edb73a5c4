"""Texts (or query-document pairs) -> one vector each with a tensor-parallel encoder from `python -m
tracer`: a sentence embedding, or a classifier's logits (a reranker's relevance, engine/scores.py).
Tokenize (as sentence-transformers does: prompts, lower-casing, truncation at max_seq_length; pairs as
CrossEncoder does), group the inputs into model calls (plan(): the grouping with the least measured
cost, as every call reads all the weights once), run each.

Two layouts (the tracer's --layout). Packed (sentence-transformers models): a call's texts go end
to end into one row of tokens, padded only up to the call's token bucket, so the linear layers
compute real tokens alone, in one GEMM per weight. Padded (plain BERT): rows padded to a bucket
length; a short text is never padded to the longest text of its batch unless that is cheaper than a
call of its own. Either way results equal sending each text alone and come back in input order.
Used by the TorchServe handler (handler/encoder_handler.py) and, without a server, in-process.
"""

from __future__ import annotations

import bisect
import itertools
import time
from pathlib import Path

import torch

from ..artifacts import tokenizer_file
from ..errors import ManifestError, PromptNameError, TextTooLongError, TokenIdError
from ..runtime.allocator import keep_freed_memory
from ..runtime.tensor_parallel_model import parallel_model_load


def load_tokenizer(model_dir: Path, lower_case: bool = False):
    """The checkpoint's fast tokenizer (verified with the model), with its own padding/truncation
    off: buckets pad, and the embedder decides what happens to text that is too long. lower_case:
    a Lowercase normalizer first, as sentence-transformers adds for do_lower_case."""
    from tokenizers import Tokenizer, normalizers

    tokenizer = Tokenizer.from_file(str(tokenizer_file(model_dir)))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    if lower_case and "Lowercase" not in repr(tokenizer.normalizer):
        tokenizer.normalizer = normalizers.Sequence([normalizers.Lowercase()]
                                                    + ([tokenizer.normalizer] if tokenizer.normalizer else []))
    return tokenizer


class Encoded:
    """One model input: token ids, their token types (a pair's second text: 1, where the family has
    token types), and how many leading tokens the pooling leaves out (a prompt, where the Pooling
    config says include_prompt: false)."""

    __slots__ = ("ids", "types", "skip")

    def __init__(self, ids: list[int], types: list[int] | None = None, skip: int = 0) -> None:
        self.ids, self.types, self.skip = ids, types, skip

    def __len__(self) -> int:
        return len(self.ids)


class Embedder:
    def __init__(self, model_dir, tp_degree: int | None = None, too_long: str = "truncate",
                 executor: str = "threads", threads_per_rank: int | None = None) -> None:
        model_dir = Path(model_dir)
        if too_long not in ("truncate", "reject"):
            raise ValueError(f"too_long must be truncate or reject, got {too_long!r}")
        # an encoder call's activations are MBs, freed and allocated again every call (the decoder's
        # steps, measured, gain nothing from this: it is set here, not for every rank)
        keep_freed_memory()
        self.model = parallel_model_load(model_dir, tp_degree=tp_degree, executor=executor,
                                         threads_per_rank=threads_per_rank)
        info = self.model.manifest.model
        if info is None or self.model.manifest.bucket_kernel is None:
            self.model.close()
            raise ManifestError(f"{model_dir}: not built by the offline tracer (no model info or buckets)")
        self.task = info.get("kind", "embedding")  # or "classification" (logits per label)
        self.sentence = info.get("sentence_transformers") or {}
        self.tokenizer = load_tokenizer(model_dir, self.sentence.get("do_lower_case", False))
        self.packed = info.get("layout") == "packed"
        self.per_token = info.get("output") == "last_hidden_state"  # a plain encoder: (input_ids, attention_mask)
        self.buckets: list[int] = self.model.manifest.sequence_buckets()  # packed: tokens per call
        self.batch_size: int = self.model.manifest.batch_size()  # rows, or packed texts, per call
        # sentence-transformers truncates at max_seq_length; a model traced with smaller buckets
        # truncates at its largest bucket (the tracer warned)
        self.max_tokens = min(info.get("max_seq_length") or self.buckets[-1], self.buckets[-1])
        self.too_long = too_long
        self.truncating = load_tokenizer(model_dir, self.sentence.get("do_lower_case", False))
        self.truncating.enable_truncation(self.max_tokens, strategy="longest_first")
        self.dimension: int | None = info.get("dimension", info.get("hidden_size"))  # each answer's length
        self.labels: dict | None = info.get("labels")  # a classifier's id2label and multi_label
        self.token_types = bool(info.get("token_types"))  # the family embeds token types (BERT's pairs)
        self.prompts: dict[str, str] = dict(self.sentence.get("prompts") or {})
        self.default_prompt: str | None = self.sentence.get("default_prompt_name")
        # where the Pooling leaves a prompt out, its length (sentence-transformers: the prompt alone,
        # less a trailing special token)
        special = {i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special}
        self.prompt_skip = {}
        if not self.sentence.get("include_prompt", True):
            for name, prompt in self.prompts.items():
                ids = self.tokenizer.encode(prompt).ids if prompt else []
                self.prompt_skip[name] = len(ids) - (1 if ids and ids[-1] in special else 0)
        self.costs: dict[tuple[int, int], float] | None = None  # measured by warm_up()

    def warm_up(self) -> None:
        """The first two runs of a traced graph are slow (TorchScript profiles them), later shapes
        of the same graph are not (measured): per bucket, one row three times and a full batch
        twice (packed: the bucket filled with warm_up_lengths() texts, three times), timing the last
        of each: the cost table of plan()."""
        costs = {}
        for bucket in self.buckets:
            if self.packed:
                trials = [(1, 3, self._packed_inputs([Encoded([1] * n) for n in self.warm_up_lengths(bucket)]))]
            else:
                trials = [(rows, runs, self._padded_inputs([Encoded([1] * bucket)] * rows, bucket))
                          for rows, runs in sorted({(1, 3), (self.batch_size, 2)})]
            for rows, runs, inputs in trials:
                for _ in range(runs - 1):
                    self.model(*inputs)
                started = time.perf_counter()
                self.model(*inputs)
                costs[bucket, rows] = time.perf_counter() - started
        self.costs = costs

    def warm_up_lengths(self, bucket: int) -> list[int]:
        """Packed: the texts warm_up() fills a bucket with: 64 tokens each, or as many fewer texts
        as batch_size allows (never more tokens each than one text may have: the tracer checked
        bucket <= batch_size x max_seq_length)."""
        texts = min(self.batch_size, -(-bucket // 64))
        return [bucket // texts + (i < bucket % texts) for i in range(texts)]

    def cost(self, bucket: int, rows: int) -> float:
        """Seconds one model call of `rows` rows of `bucket` tokens takes, interpolated from the
        warm-up's timings (without them: padded tokens plus a fixed cost of one bucket-16 row).
        Packed, a call is one row of `bucket` tokens whatever the texts in it."""
        if self.packed:
            rows = 1
        if self.costs is None:
            return bucket * rows + 16
        one = self.costs[bucket, 1]
        if rows == 1:
            return one
        full = self.costs[bucket, self.batch_size]
        return one + (full - one) * (rows - 1) / max(1, self.batch_size - 1)

    def bucket_for(self, tokens: int) -> int | None:
        """The smallest bucket that holds `tokens`, or None where none does."""
        at = bisect.bisect_left(self.buckets, tokens)
        return self.buckets[at] if at < len(self.buckets) else None

    def plan(self, lengths: list[int]) -> list[tuple[int, list[int]]]:
        """Model calls (bucket, input indices) for inputs of these token counts, at least cost.

        Each model call reads all the weights once (measured: at a few rows a call costs a fixed
        part, the weight reads, plus a part per token it computes), so one call per input, or per
        distinct length, is not the cheapest. Packed: the inputs in order, cut into calls of at most
        batch_size texts whose tokens fit the largest bucket (one call, unless the tokens overflow it
        or two smaller buckets cost less). Padded: inputs sorted by length, cut into runs of at most
        batch_size, each padded to the bucket of its longest input."""
        if self.packed:
            order = list(range(len(lengths)))
            ends = list(itertools.accumulate(lengths, initial=0))
            return self._cheapest_runs(order, lambda start, end: self.bucket_for(ends[end] - ends[start]))
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        return self._cheapest_runs(order, lambda start, end: self.bucket_for(lengths[order[end - 1]]))

    def _cheapest_runs(self, order: list[int], bucket_of_run) -> list[tuple[int, list[int]]]:
        """`order` cut into runs of at most batch_size inputs, run order[start:end] taking the bucket
        bucket_of_run(start, end) (None: it fits none), at the cuts whose runs' measured costs add
        up least (dynamic programming over the cuts)."""
        n = len(order)
        best, cut, bucket = [0.0] + [float("inf")] * n, [0] * (n + 1), [0] * (n + 1)
        for end in range(1, n + 1):
            for start in range(max(0, end - self.batch_size), end):
                if (run_bucket := bucket_of_run(start, end)) is None:
                    continue
                total = best[start] + self.cost(run_bucket, end - start)
                if total < best[end]:
                    best[end], cut[end], bucket[end] = total, start, run_bucket
        plan, end = [], n
        while end:
            plan.append((bucket[end], order[cut[end]:end]))
            end = cut[end]
        return plan[::-1]

    def prompt(self, name: str | None) -> tuple[str, int]:
        """(prompt text, tokens the pooling skips) of a prompt name; None: the model's default prompt (none
        where it has none), as SentenceTransformer.encode(prompt_name=...) applies them."""
        name = self.default_prompt if name is None else name
        if name is None:
            return "", 0
        if name not in self.prompts:
            known = ", ".join(sorted(self.prompts)) or "none"
            raise PromptNameError(f"unknown prompt_name {name!r}; this model's prompts: {known}")
        return self.prompts[name], self.prompt_skip.get(name, 0)

    def token_ids(self, texts: list, prompt_name: str | None = None) -> tuple[list[Encoded], bool]:
        """Each text (a string, or a (query, document) pair: a cross-encoder's input) tokenized as
        sentence-transformers / CrossEncoder does, and whether any was truncated. A text is prefixed by
        the prompt (prompt_name, else the model's default). Longer than max_tokens: truncated (the
        tokenizer's longest-first truncation, special tokens kept) or TextTooLongError."""
        prompt, skip = self.prompt(prompt_name)
        inputs = [tuple(t) if isinstance(t, (list, tuple)) else prompt + t for t in texts]
        encoded = self.tokenizer.encode_batch(inputs)
        too_long = [i for i, e in enumerate(encoded) if len(e.ids) > self.max_tokens]
        if too_long and self.too_long == "reject":
            raise TextTooLongError(f"text {too_long[0]} has {len(encoded[too_long[0]].ids)} tokens; "
                                   f"the limit is {self.max_tokens}")
        if too_long:
            for i, e in zip(too_long, self.truncating.encode_batch([inputs[i] for i in too_long]), strict=True):
                encoded[i] = e
        return [Encoded(e.ids, e.type_ids if self.token_types else None, 0 if isinstance(t, tuple) else skip)
                for e, t in zip(encoded, inputs, strict=True)], bool(too_long)

    def checked_ids(self, arrays: list[list[int]]) -> tuple[list[Encoded], bool]:
        """Token-id arrays a client sent (ids of this model's tokenizer, used as given), and whether
        any was cut to max_tokens. An id outside the vocabulary: TokenIdError; too long with
        too_long="reject": TextTooLongError."""
        vocab = self.tokenizer.get_vocab_size()
        for i, ids in enumerate(arrays):
            if (bad := next((t for t in ids if not 0 <= t < vocab), None)) is not None:
                raise TokenIdError(f"token-id array {i} holds {bad}, outside this model's vocabulary (0..{vocab - 1})")
        too_long = [i for i, ids in enumerate(arrays) if len(ids) > self.max_tokens]
        if too_long and self.too_long == "reject":
            raise TextTooLongError(f"token-id array {too_long[0]} has {len(arrays[too_long[0]])} tokens; "
                                   f"the limit is {self.max_tokens}")
        return [Encoded(ids[:self.max_tokens]) for ids in arrays], bool(too_long)

    def embed_ids(self, inputs: list[Encoded], on_sub_batch=None) -> list:
        """One vector per input (an embedding, or a classifier's logits), in input order, run in the
        sub-batches of plan(). A sub-batch that fails (e.g. RankExecutionError) yields its exception in
        place of each of its vectors: the rest of the batch is still answered. on_sub_batch(bucket,
        texts, real_tokens, computed_tokens, seconds) is called after each sub-batch the model ran (the
        handler's metrics)."""
        inputs = [x if isinstance(x, Encoded) else Encoded(list(x)) for x in inputs]
        results: list = [None] * len(inputs)
        for bucket, chunk in self.plan([len(x) for x in inputs]):
            texts = [inputs[i] for i in chunk]
            model_inputs = self._packed_inputs(texts) if self.packed else self._padded_inputs(texts, bucket)
            started = time.perf_counter()
            try:
                rows = self.model(*model_inputs).tolist()
            except Exception as exc:  # noqa: BLE001 - this sub-batch fails, not the whole batch
                for i in chunk:
                    results[i] = exc
                continue
            if on_sub_batch is not None:
                on_sub_batch(bucket, len(chunk), sum(len(inputs[i]) for i in chunk),
                             bucket if self.packed else bucket * len(chunk), time.perf_counter() - started)
            for row, i in enumerate(chunk):
                results[i] = rows[row]
        return results

    @staticmethod
    def _packed_inputs(texts: list[Encoded]) -> tuple[torch.Tensor, ...]:
        """input_ids, positions, token types, pooling mask [tokens], lengths [texts]; the bucket kernel pads them."""
        ids = torch.tensor([t for text in texts for t in text.ids], dtype=torch.long)
        positions = torch.cat([torch.arange(len(text)) for text in texts])
        types = torch.tensor([t for text in texts for t in (text.types or [0] * len(text))], dtype=torch.long)
        pool = torch.cat([(torch.arange(len(text)) >= text.skip).long() for text in texts])
        return ids, positions, types, pool, torch.tensor([len(text) for text in texts], dtype=torch.long)

    def _padded_inputs(self, texts: list[Encoded], bucket: int) -> tuple[torch.Tensor, ...]:
        """input_ids and attention_mask [texts, bucket] (a plain encoder's), then token types and the
        pooling mask."""
        ids, mask, types, pool = (torch.zeros(len(texts), bucket, dtype=torch.long) for _ in range(4))
        for row, text in enumerate(texts):
            n = len(text)
            ids[row, :n] = torch.tensor(text.ids)
            mask[row, :n] = 1
            types[row, :n] = torch.tensor(text.types or [0] * n)
            pool[row, text.skip:n] = 1
        return (ids, mask) if self.per_token else (ids, mask, types, pool)

    def embed(self, texts: list, prompt_name: str | None = None) -> list[list[float]]:
        """Vectors for texts (or pairs), raising the first error."""
        results = self.embed_ids(self.token_ids(texts, prompt_name)[0])
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results

    def close(self) -> None:
        self.model.close()
