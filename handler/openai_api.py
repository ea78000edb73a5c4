"""OpenAI-compatible API shapes shared by the handlers: routes, errors, the model list, embeddings.

TorchServe hands a handler the part of the URL after /predictions/NAME/VERSION/ as the request
header `url_path`, so an OpenAI client pointed at base_url http://HOST:8080/predictions/NAME/1.0/v1
reaches these routes:

    POST v1/embeddings          (embedding models; OpenAIEmbeddings)
    POST v1/rerank              (classification models: handler/rerank_api.py)
    POST v1/completions         (generation models; handler/openai_generation.py)
    POST v1/chat/completions    (generation models)
    GET  v1/models              (any model; TorchServe gives the handler no method, so any body)

Errors use OpenAI's shape, {"error": {"message", "type", "code"}}, with the HTTP status. The `model`
field of a request is not checked: the URL already names the model (as Text Embeddings Inference
does), and answers carry the served name.

(Kept out of the handler modules: TorchServe requires a handler module to define exactly one class.)
"""

from __future__ import annotations

import base64
import json
import struct
import time

from handler.encoder_requests import EncoderRequest
from handler.request_parsing import (
    RequestError,
    body_kind,
    check_unicode,
    decode_json,
    error_answer,
    error_body,
    float32_json,
)

NATIVE = ""
EMBEDDINGS, COMPLETIONS, CHAT, MODELS = "v1/embeddings", "v1/completions", "v1/chat/completions", "v1/models"
ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error",
               415: "invalid_request_error", 500: "server_error"}


def route(context, idx: int) -> str:
    """The API path of request idx: NATIVE ('') for /predictions/NAME[/VERSION], else e.g. 'v1/embeddings'."""
    path = context.get_request_header(idx, "url_path") or ""
    return path.strip("/")


def check_route(path: str, served: tuple[str, ...]) -> None:
    """404 (OpenAI shape) for a path this handler does not serve."""
    if path not in (NATIVE, MODELS, *served):
        raise RequestError(404, f"unknown endpoint {path!r}; this model serves {', '.join(('v1/models', *served))}")


def route_error(context, idx: int, path: str, status: int, message: str) -> str:
    """A request's error in its route's shape: native {"error", "status"}, or OpenAI's
    {"error": {"message", "type", "code"}}."""
    if path == NATIVE:
        return error_answer(context, idx, status, message)
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return error_body(context, idx, status, {"error": {"message": message, "type": kind, "code": status}})


def models_answer(model_name: str, created: int) -> str:
    return json.dumps({"object": "list", "data": [
        {"id": model_name, "object": "model", "created": created, "owned_by": "tpserve"}]})


def read_json(value, content_type: str) -> dict:
    """The JSON object of an OpenAI request body, or RequestError."""
    if body_kind(content_type) != "json":
        raise RequestError(415, "OpenAI routes take JSON: send it with 'Content-Type: application/json'")
    if isinstance(value, (bytes, bytearray)) and not value.strip():
        raise RequestError(400, "empty body: POST a JSON object")
    value = decode_json(value)
    if not isinstance(value, dict):
        raise RequestError(400, "body must be a JSON object")
    model = value.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(400, '"model" must be a string')
    return value


# ---- embeddings --------------------------------------------------------------------------------
EMBEDDING_KEYS = {"model", "input", "encoding_format", "dimensions", "user"}


def parse_embeddings(body: dict, max_inputs: int, dimension: int) -> tuple[list[str] | list[list[int]], str]:
    """(texts or token-id arrays, encoding_format) of a /v1/embeddings body, or RequestError.
    Token-id arrays are ids of this model's tokenizer (as vLLM takes them), used as given."""
    if unknown := sorted(set(body) - EMBEDDING_KEYS):
        raise RequestError(400, f"unknown fields {unknown}; known: {sorted(EMBEDDING_KEYS)}")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise RequestError(400, '"encoding_format" must be "float" or "base64"')
    dimensions = body.get("dimensions")
    if dimensions is not None and dimensions != dimension:
        raise RequestError(400, f"this model's embeddings have {dimension} dimensions and cannot be shortened "
                                f"(\"dimensions\": {dimensions!r})")
    value = body.get("input")
    if isinstance(value, str):
        inputs = [value]
    elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        inputs = value
    elif isinstance(value, list) and value and all(_is_id(v) for v in value):
        inputs = [value]  # one token-id array
    elif isinstance(value, list) and value and all(isinstance(v, list) and v and all(map(_is_id, v)) for v in value):
        inputs = value
    else:
        raise RequestError(400, '"input" must be a string, a non-empty list of strings, a token-id array or '
                                'a list of non-empty token-id arrays')
    if len(inputs) > max_inputs:
        raise RequestError(413, f"{len(inputs)} inputs in one request; the limit is {max_inputs}")
    for i, text in enumerate(inputs):
        if isinstance(text, str):
            if not text.strip():
                raise RequestError(400, f"input {i} is empty")
            check_unicode(text, f"input {i}")
    return inputs, encoding


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def embeddings_answer(model_name: str, vectors: list[list[float]], encoding: str, tokens: int) -> str:
    data = []
    for index, vector in enumerate(vectors):
        if encoding == "base64":  # little-endian float32, as OpenAI sends (its client's default)
            embedding = json.dumps(base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii"))
        else:
            embedding = float32_json(vector)
        data.append(f'{{"object":"embedding","index":{index},"embedding":{embedding}}}')
    return (f'{{"object":"list","data":[{",".join(data)}],"model":{json.dumps(model_name)},'
            f'"usage":{{"prompt_tokens":{tokens},"total_tokens":{tokens}}}}}')


def created_now() -> int:
    return int(time.time())


class OpenAIEmbeddings:
    """POST v1/embeddings: the adapter of handler/encoder_requests.py (texts take the model's default prompt)."""

    def parse(self, value, content_type: str, model, context=None, idx: int = 0):
        inputs, encoding = parse_embeddings(read_json(value, content_type), model.max_inputs, model.dimension)
        return EncoderRequest(adapter=self, inputs=inputs, options={"encoding": encoding})

    def answer(self, request, model, context=None, idx: int = 0) -> str:
        tokens = sum(map(len, request.encoded))
        return embeddings_answer(model.name, request.vectors, request.options["encoding"], tokens)

    def error(self, request, model, context, idx: int) -> str:
        return route_error(context, idx, EMBEDDINGS, request.status, request.error)


class OpenAIModels:
    """GET v1/models (any body: TorchServe gives the handler no method): the served model."""

    def parse(self, value, content_type: str, model, context=None, idx: int = 0):
        return EncoderRequest(adapter=self, task="models")

    def answer(self, request, model, context=None, idx: int = 0) -> str:
        return models_answer(model.name, model.created)

    def error(self, request, model, context, idx: int) -> str:
        return route_error(context, idx, MODELS, request.status, request.error)
