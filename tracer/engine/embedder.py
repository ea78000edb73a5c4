"""Texts -> sentence embeddings with a tensor-parallel model from `python -m tracer`: tokenize,
group the texts into model calls (plan(): the grouping with the least measured cost, as every call
reads all the weights once), run each.

Two layouts (the tracer's --layout). Packed (sentence-transformers models): a call's texts go end
to end into one row of tokens, padded only up to the call's token bucket, so the linear layers
compute real tokens alone, in one GEMM per weight. Padded (plain BERT): rows padded to a bucket
length; a short text is never padded to the longest text of its batch unless that is cheaper than a
call of its own. Either way results equal sending each text alone and come back in input order.
Used by the TorchServe handler (handler/embedding_handler.py) and, without a server, in-process.
"""

from __future__ import annotations

import bisect
import itertools
import time
from pathlib import Path

import torch

from ..artifacts import tokenizer_file
from ..errors import ManifestError, TextTooLongError, TokenIdError
from ..runtime.allocator import keep_freed_memory
from ..runtime.tensor_parallel_model import parallel_model_load


def load_tokenizer(model_dir: Path):
    """The checkpoint's fast tokenizer (verified with the model), with its own padding/truncation
    off: buckets pad, and the embedder decides what happens to text that is too long."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file(model_dir)))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


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
        self.tokenizer = load_tokenizer(model_dir)
        self.packed = info.get("layout") == "packed"
        self.buckets: list[int] = self.model.manifest.sequence_buckets()  # packed: tokens per call
        self.batch_size: int = self.model.manifest.batch_size()  # rows, or packed texts, per call
        # sentence-transformers truncates at max_seq_length; a model traced with smaller buckets
        # truncates at its largest bucket (the tracer warned)
        self.max_tokens = min(info.get("max_seq_length") or self.buckets[-1], self.buckets[-1])
        self.too_long = too_long
        self.dimension: int | None = info.get("hidden_size")  # mean/CLS pooling: the embedding's size
        self.costs: dict[tuple[int, int], float] | None = None  # measured by warm_up()

    def warm_up(self) -> None:
        """The first two runs of a traced graph are slow (TorchScript profiles them), later shapes
        of the same graph are not (measured): per bucket, one row three times and a full batch
        twice (packed: the bucket filled with warm_up_lengths() texts, three times), timing the last
        of each: the cost table of plan()."""
        costs = {}
        for bucket in self.buckets:
            if self.packed:
                trials = [(1, 3, self._packed_inputs([[1] * n for n in self.warm_up_lengths(bucket)]))]
            else:
                trials = [(rows, runs, (torch.ones(rows, bucket, dtype=torch.long),) * 2)
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

    def token_ids(self, texts: list[str]) -> tuple[list[list[int]], bool]:
        """Token ids per text, and whether any was truncated. Longer than max_tokens: truncate
        (keeping the final [SEP], as sentence-transformers does) or TextTooLongError."""
        limit = self.max_tokens
        encoded = [e.ids for e in self.tokenizer.encode_batch(texts)]
        too_long = [i for i, ids in enumerate(encoded) if len(ids) > limit]
        if too_long and self.too_long == "reject":
            raise TextTooLongError(f"text {too_long[0]} has {len(encoded[too_long[0]])} tokens; "
                                   f"the limit is {limit}")
        return [ids[:limit - 1] + ids[-1:] if len(ids) > limit else ids for ids in encoded], bool(too_long)

    def checked_ids(self, arrays: list[list[int]]) -> tuple[list[list[int]], bool]:
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
        return [ids[:self.max_tokens] for ids in arrays], bool(too_long)

    def embed_ids(self, token_ids: list[list[int]], on_sub_batch=None) -> list:
        """Embeddings in input order, run in the sub-batches of plan(). A sub-batch that fails (e.g.
        RankExecutionError) yields its exception in place of each of its embeddings: the rest of
        the batch is still answered. on_sub_batch(bucket, texts, real_tokens, computed_tokens,
        seconds) is called after each sub-batch the model ran (the handler's metrics)."""
        results: list = [None] * len(token_ids)
        for bucket, chunk in self.plan([len(ids) for ids in token_ids]):
            texts = [token_ids[i] for i in chunk]
            inputs = self._packed_inputs(texts) if self.packed else self._padded_inputs(texts, bucket)
            started = time.perf_counter()
            try:
                rows = self.model(*inputs).tolist()
            except Exception as exc:  # noqa: BLE001 - this sub-batch fails, not the whole batch
                for i in chunk:
                    results[i] = exc
                continue
            if on_sub_batch is not None:
                on_sub_batch(bucket, len(chunk), sum(len(token_ids[i]) for i in chunk),
                             bucket if self.packed else bucket * len(chunk), time.perf_counter() - started)
            for row, i in enumerate(chunk):
                results[i] = rows[row]
        return results

    @staticmethod
    def _packed_inputs(texts: list[list[int]]) -> tuple[torch.Tensor, ...]:
        """input_ids and positions [tokens], lengths [texts]; the bucket kernel pads them."""
        ids = torch.tensor([t for text in texts for t in text], dtype=torch.long)
        positions = torch.cat([torch.arange(len(text)) for text in texts])
        return ids, positions, torch.tensor([len(text) for text in texts], dtype=torch.long)

    @staticmethod
    def _padded_inputs(texts: list[list[int]], bucket: int) -> tuple[torch.Tensor, ...]:
        """input_ids and attention_mask [texts, bucket]."""
        ids = torch.zeros(len(texts), bucket, dtype=torch.long)
        mask = torch.zeros(len(texts), bucket, dtype=torch.long)
        for row, text in enumerate(texts):
            ids[row, :len(text)] = torch.tensor(text)
            mask[row, :len(text)] = 1
        return ids, mask

    def embed(self, texts: list[str]) -> list[list[float]]:
        results = self.embed_ids(self.token_ids(texts)[0])
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results

    def close(self) -> None:
        self.model.close()
