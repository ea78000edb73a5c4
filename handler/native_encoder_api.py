"""The native protocol of encoder models, POST /predictions/NAME (Text Embeddings Inference's shapes).

Embedding models:
    text/plain body                                       -> one embedding
    {"inputs": "text" | ["text", ...], "prompt_name"?}    -> one embedding | a list, in order
Classification models (rerankers, classifiers):
    {"query": "q", "texts": ["d1", ...], "raw_scores"?: false, "return_text"?: false, "top_n"?: null}
        -> [{"index", "score", "text"?}] by score, highest first (TEI's /rerank)
    {"inputs": "text" | ["text" | ["text", "text"], ...], "raw_scores"?: false} or a text/plain body
        -> [{"label", "score"}] per input, highest first (TEI's /predict)
Errors: {"error": message, "status": status} with the HTTP status.

(Kept out of the handler module: TorchServe requires a handler module to define exactly one class.)
"""

from __future__ import annotations

import json

from handler.encoder_requests import EncoderRequest, ModelInfo
from handler.request_parsing import RequestError, check_texts, decode_body, error_answer, float32_json, parse_native
from tracer.engine import scores

RERANK_FIELDS = {"query", "texts", "raw_scores", "return_text", "top_n", "truncate"}


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise RequestError(400, f'"{name}" must be true or false')
    return value


def top_n(value, count: int, name: str = "top_n") -> int | None:
    """A request's top_n: None (all) or a positive int."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise RequestError(400, f'"{name}" must be a positive integer or null')
    return min(value, count)


def documents(value, max_documents: int, what: str = "texts") -> list[str]:
    """The documents of a rerank request: a non-empty list of non-blank strings, at most max_documents."""
    if not isinstance(value, list) or not value:
        raise RequestError(400, f'"{what}" must be a non-empty list of strings')
    if len(value) > max_documents:
        raise RequestError(413, f"{len(value)} documents in one request; the limit is {max_documents}")
    if not all(isinstance(t, str) for t in value):
        raise RequestError(400, f'"{what}" must be a non-empty list of strings')
    check_texts(value, "document")
    return value


def query(value) -> str:
    if not isinstance(value, str):
        raise RequestError(400, '"query" must be a string')
    check_texts([value], "query")
    return value


class NativeEncoderApi:
    def parse(self, value, content_type: str, model: ModelInfo, context=None, idx: int = 0) -> EncoderRequest:
        request = EncoderRequest(adapter=self)
        if model.kind == "classification":
            body = decode_body(value, content_type)
            if isinstance(body, dict) and "query" in body:
                if unknown := sorted(set(body) - RERANK_FIELDS):
                    raise RequestError(400, f"unknown fields {unknown}; known: {sorted(RERANK_FIELDS)}")
                texts = documents(body.get("texts"), model.max_documents)
                request.task, request.inputs = "rerank", [(query(body["query"]), t) for t in texts]
                request.options = {"raw": _flag(body, "raw_scores"), "return_text": _flag(body, "return_text"),
                                   "top_n": top_n(body.get("top_n"), len(texts)), "texts": texts}
                return request
            request.task = "classify"
            request.inputs, request.options["as_list"], extras = parse_native(
                body, "application/json" if isinstance(body, dict) else "text/plain", model.max_inputs,
                ("raw_scores", "truncate"), pairs=True)
            request.options["raw"] = _flag(extras, "raw_scores")
            return request
        request.inputs, request.options["as_list"], extras = parse_native(value, content_type, model.max_inputs,
                                                                          ("prompt_name", "truncate"))
        name = extras.get("prompt_name")
        if name is not None and not isinstance(name, str):
            raise RequestError(400, '"prompt_name" must be a string')
        request.prompt_name = name
        return request

    def answer(self, request: EncoderRequest, model: ModelInfo, context=None, idx: int = 0) -> str:
        if request.task == "rerank":
            relevance = [scores.relevance(v, request.options["raw"]) for v in request.vectors]
            texts = request.options["texts"]
            return json.dumps([{"index": i, "score": relevance[i],
                                **({"text": texts[i]} if request.options["return_text"] else {})}
                               for i in scores.ranked(relevance, request.options["top_n"])])
        if request.task == "classify":
            answers = [scores.label_scores(v, model.labels or {}, request.options["raw"]) for v in request.vectors]
            return json.dumps(answers if request.options["as_list"] else answers[0])
        vectors = list(map(float32_json, request.vectors))
        return "[" + ",".join(vectors) + "]" if request.options["as_list"] else vectors[0]

    def error(self, request: EncoderRequest, model: ModelInfo, context, idx: int) -> str:
        return error_answer(context, idx, request.status, request.error)
