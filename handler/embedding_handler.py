"""TorchServe handler: sentence embeddings from a tensor-parallel model traced by `python -m tracer`.

Each text runs in the smallest bucket that fits it. A dynamic batch is grouped by bucket and run
one sub-batch per bucket, so a short text is never padded to the longest text of its batch; results
equal sending each text alone and come back in request order. Bad input gets a 4xx JSON answer for
that request only; the worker keeps serving.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from pathlib import Path

import torch
from ts.torch_handler.base_handler import BaseHandler

import tracer
from handler.request_parsing import RequestError, parse_texts
from tracer.hf_checkpoint import MODEL_INFO, load_tokenizer

logger = logging.getLogger(__name__)


class EmbeddingHandler(BaseHandler):
    def initialize(self, context) -> None:
        started = time.time()
        model_dir = Path(context.system_properties["model_dir"])
        settings = (getattr(context, "model_yaml_config", None) or {}).get("handler", {})
        self.info = json.loads((model_dir / MODEL_INFO).read_text())
        self.model = tracer.parallel_model_load(model_dir, tp_degree=settings.get("tp_degree"))
        self.tokenizer = load_tokenizer(model_dir)
        self.buckets: list[int] = self.info["buckets"]
        self.batch_size: int = self.info["batch_size"]
        self.max_inputs = int(settings.get("max_inputs_per_request", 64))
        self.too_long = settings.get("too_long", "truncate")
        if self.too_long not in ("truncate", "reject"):
            raise ValueError(f"handler.too_long must be truncate or reject, got {self.too_long!r}")
        for bucket in self.buckets:  # warm up: the first runs of a traced graph are slow
            for rows in sorted({1, self.batch_size}):
                ones = torch.ones(rows, bucket, dtype=torch.long)
                for _ in range(2):
                    self.model(ones, ones)
        logger.info("tpserve: loaded tp=%d buckets=%s batch=%d in %.1fs", self.model.tp_degree, self.buckets,
                    self.batch_size, time.time() - started)
        self.initialized = True

    def _token_ids(self, texts: list[str]) -> tuple[list[list[int]], bool]:
        """Token ids per text; (ids, truncated). Too long: truncate (keeping the final [SEP]) or 413."""
        limit = self.buckets[-1]
        encoded = [e.ids for e in self.tokenizer.encode_batch(texts)]
        too_long = [i for i, ids in enumerate(encoded) if len(ids) > limit]
        if too_long and self.too_long == "reject":
            raise RequestError(413, f"text {too_long[0]} has {len(encoded[too_long[0]])} tokens; "
                                    f"the largest bucket is {limit}")
        return [ids[:limit - 1] + ids[-1:] if len(ids) > limit else ids for ids in encoded], bool(too_long)

    def embed(self, token_ids: list[list[int]], metrics=None) -> list[list[float]]:
        """Embeddings in input order; one sub-batch (of at most batch_size) per bucket."""
        by_bucket: dict[int, list[int]] = defaultdict(list)
        for i, ids in enumerate(token_ids):
            by_bucket[next(b for b in self.buckets if len(ids) <= b)].append(i)
        results: list = [None] * len(token_ids)
        for bucket, members in sorted(by_bucket.items()):
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                ids = torch.zeros(len(chunk), bucket, dtype=torch.long)
                mask = torch.zeros(len(chunk), bucket, dtype=torch.long)
                for row, i in enumerate(chunk):
                    ids[row, :len(token_ids[i])] = torch.tensor(token_ids[i])
                    mask[row, :len(token_ids[i])] = 1
                t0 = time.perf_counter()
                out = self.model(ids, mask)
                if metrics is not None:
                    real = sum(len(token_ids[i]) for i in chunk)
                    metrics.add_counter("RequestsPerBucket", len(chunk), dimensions=[_dim("bucket", bucket)])
                    metrics.add_percent("PaddingFraction", 100 * (1 - real / (bucket * len(chunk))),
                                        dimensions=[_dim("bucket", bucket)])
                    metrics.add_time("ModelTime", (time.perf_counter() - t0) * 1000, unit="ms")
                for row, i in enumerate(chunk):
                    results[i] = out[row].tolist()
        return results

    def handle(self, data, context):
        answers: list = [None] * len(data)
        pending = []  # (request index, texts, as_list, truncated)
        for idx, row in enumerate(data):
            if isinstance(row, dict) and "json" in row:  # gRPC: {"json": b'{"inputs": [...]}'}
                value, content_type = row["json"], "application/json"
            else:
                value = row.get("body", row.get("data")) if isinstance(row, dict) else row
                content_type = (context.get_request_header(idx, "Content-Type") or "").lower()
            try:
                texts, as_list = parse_texts(value, content_type, self.max_inputs)
                ids, truncated = self._token_ids(texts)
                pending.append((idx, ids, as_list, truncated))
            except RequestError as exc:
                context.set_response_status(exc.status, str(exc), idx=idx)
                answers[idx] = json.dumps({"error": str(exc), "status": exc.status})
        flat = [ids for _, batch, _, _ in pending for ids in batch]
        embeddings = iter(self.embed(flat, context.metrics) if flat else [])
        for idx, batch, as_list, truncated in pending:
            vectors = [next(embeddings) for _ in batch]
            answers[idx] = json.dumps(vectors if as_list else vectors[0])
            if truncated:
                context.set_response_header(idx, "X-Tpserve-Truncated", "true")
        return answers


def _dim(name: str, value) -> object:
    from ts.metrics.dimension import Dimension

    return Dimension(name, str(value))
