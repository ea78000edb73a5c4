"""TorchServe handler: sentence embeddings from a tensor-parallel model traced by `python -m tracer`.

Bodies: text/plain (one text -> one embedding), JSON {"inputs": "text"} (same) or
{"inputs": ["t1", ...]} (a list of embeddings, in order). A dynamic batch is run one sub-batch per
bucket (handler/embedder.py). Bad input gets a 4xx JSON answer for that request only; the worker
keeps serving. Settings come from model-config.yaml's `handler:` section.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from ts.torch_handler.base_handler import BaseHandler

from handler.embedder import Embedder
from handler.request_parsing import RequestError, parse_texts
from tracer.errors import ArtifactError

logger = logging.getLogger(__name__)


class EmbeddingHandler(BaseHandler):
    def initialize(self, context) -> None:
        started = time.time()
        config = getattr(context, "model_yaml_config", None) or {}
        settings = config.get("handler", {})
        # TorchServe's torchrun mode (parallelType tp): this worker is one rank; torchrun made the group
        executor = "torchrun" if config.get("parallelType") == "tp" and "torchrun" in config else "threads"
        model_dir = Path(context.system_properties["model_dir"])
        try:
            self.embedder = Embedder(model_dir, tp_degree=settings.get("tp_degree"),
                                     too_long=settings.get("too_long", "truncate"), executor=executor)
        except ArtifactError as exc:  # tampered, incomplete or foreign artifacts: never serve them
            logger.error("tpserve: refusing to load %s: %s: %s", model_dir.name, type(exc).__name__, exc)
            raise
        self.max_inputs = int(settings.get("max_inputs_per_request", 64))
        self.embedder.warm_up()
        logger.info("tpserve: loaded tp=%d buckets=%s batch=%d executor=%s in %.1fs", self.embedder.model.tp_degree,
                    self.embedder.buckets, self.embedder.batch_size, executor, time.time() - started)
        self.initialized = True

    def handle(self, data, context):
        answers: list = [None] * len(data)
        pending = []  # (request index, token ids per text, answer is a list, truncated)
        for idx, row in enumerate(data):
            if isinstance(row, dict) and "json" in row:  # gRPC: {"json": b'{"inputs": [...]}'}
                value, content_type = row["json"], "application/json"
            else:
                value = row.get("body", row.get("data")) if isinstance(row, dict) else row
                content_type = (context.get_request_header(idx, "Content-Type") or "").lower()
            try:
                texts, as_list = parse_texts(value, content_type, self.max_inputs)
                ids, truncated = self.embedder.token_ids(texts)
                pending.append((idx, ids, as_list, truncated))
            except RequestError as exc:
                context.set_response_status(exc.status, str(exc), idx=idx)
                answers[idx] = json.dumps({"error": str(exc), "status": exc.status})
        flat = [ids for _, batch, _, _ in pending for ids in batch]
        embeddings = iter(self.embedder.embed_ids(flat, context.metrics) if flat else [])
        for idx, batch, as_list, truncated in pending:
            vectors = [next(embeddings) for _ in batch]
            failed = next((v for v in vectors if isinstance(v, Exception)), None)
            if failed is not None:  # the model failed (e.g. in one rank): 500 for this request only
                message = f"model error: {failed}"
                context.set_response_status(500, message, idx=idx)
                answers[idx] = json.dumps({"error": message, "status": 500})
                continue
            answers[idx] = "[" + ",".join(map(_vector_json, vectors)) + "]" if as_list else _vector_json(vectors[0])
            if truncated:
                context.set_response_header(idx, "X-Tpserve-Truncated", "true")
        return answers


def _vector_json(vector: list[float]) -> str:
    """A float32 embedding as a JSON list. 9 significant digits round-trip any float32 exactly;
    json.dumps would write the float64 repr (17 digits): 60 % more bytes, twice the time."""
    return "[" + ",".join(map("%.9g".__mod__, vector)) + "]"
