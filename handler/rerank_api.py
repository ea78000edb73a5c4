"""The rerank API of Cohere and Jina (what LangChain, LlamaIndex and vLLM's clients call), for
classification models: POST /predictions/NAME/1.0/v1/rerank (also v2/rerank and rerank).

    {"model"?, "query": "q", "documents": ["d1" | {"text": "d1"}, ...], "top_n"?: null, "return_documents"?: true}
    -> {"id", "model", "results": [{"index", "relevance_score", "document"?: {"text"}}], "usage": {"total_tokens"}}

Results are by relevance_score, highest first: a one-label cross-encoder's sigmoid (what
CrossEncoder.predict gives). Errors in OpenAI's shape, as the other v1 routes.

(Kept out of the handler module: TorchServe requires a handler module to define exactly one class.)
"""

from __future__ import annotations

import json
import uuid

from handler import openai_api
from handler.encoder_requests import EncoderRequest, ModelInfo
from handler.native_encoder_api import documents, query, top_n
from handler.request_parsing import RequestError

ROUTES = ("v1/rerank", "v2/rerank", "rerank")
FIELDS = {"model", "query", "documents", "top_n", "return_documents", "rank_fields", "max_chunks_per_doc",
          "truncation", "truncate"}


def _text(document) -> str:
    if isinstance(document, dict) and set(document) == {"text"}:
        return document["text"]
    return document


class RerankApi:
    def parse(self, value, content_type: str, model: ModelInfo, context=None, idx: int = 0) -> EncoderRequest:
        body = openai_api.read_json(value, content_type)
        if unknown := sorted(set(body) - FIELDS):
            raise RequestError(400, f"unknown fields {unknown}; known: {sorted(FIELDS)}")
        if body.get("rank_fields") not in (None, ["text"]):
            raise RequestError(400, '"rank_fields": only ["text"] is supported')
        raw = body.get("documents")
        texts = documents([_text(d) for d in raw] if isinstance(raw, list) else raw, model.max_documents,
                          "documents")
        return_documents = body.get("return_documents", True)
        if not isinstance(return_documents, bool):
            raise RequestError(400, '"return_documents" must be true or false')
        return EncoderRequest(adapter=self, task="rerank", inputs=[(query(body.get("query")), t) for t in texts],
                              options={"top_n": top_n(body.get("top_n"), len(texts)), "texts": texts,
                                       "return_documents": return_documents})

    def answer(self, request: EncoderRequest, model: ModelInfo, context=None, idx: int = 0) -> str:
        from tracer.engine import scores

        relevance = [scores.relevance(v) for v in request.vectors]
        texts = request.options["texts"]
        results = [{"index": i, "relevance_score": relevance[i],
                    **({"document": {"text": texts[i]}} if request.options["return_documents"] else {})}
                   for i in scores.ranked(relevance, request.options["top_n"])]
        tokens = sum(map(len, request.encoded or []))
        return json.dumps({"id": f"rerank-{uuid.uuid4().hex}", "model": model.name, "results": results,
                           "usage": {"total_tokens": tokens}})

    def error(self, request: EncoderRequest, model: ModelInfo, context, idx: int) -> str:
        return openai_api.route_error(context, idx, "v1/rerank", request.status, request.error)
