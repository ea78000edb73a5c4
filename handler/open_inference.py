"""The Open Inference Protocol (KServe v2) for encoder models, as TorchServe 0.12 passes it on.

REST `POST /v2/models/NAME/infer` reaches the handler as the client's JSON body; gRPC `ModelInfer`
(open_inference_grpc.proto, package org.pytorch.serve.grpc.openinference) arrives as JSON the
frontend wrote, {"id", "model_name", "inputs": [...]}, with BYTES contents base64-encoded and no
HTTP headers at all. Either way an embedding request is one BYTES input of n texts (shape [n] or
[n, 1]) and the answer one FP32 output "embedding" of shape [n, dim] (data flat, row-major); a
reranker takes "query" and "documents" and a classifier texts (OpenInferenceApi says what comes back).

Errors: over REST the status and {"error": message}, as KServe v2 defines. Over gRPC TorchServe
ignores the status a handler sets, and an answer without id / model_name / model_version / outputs
makes the frontend restart the worker; so a bad gRPC request is answered with one BYTES output
named "error" holding the message (handler.grpc_client raises it as PredictionError).

(Kept out of encoder_handler.py: TorchServe requires a handler module to define exactly one class.)
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json

from handler.encoder_requests import EncoderRequest, ModelInfo
from handler.request_parsing import RequestError, body_kind, check_unicode, error_body, float32_json
from tracer.engine import scores


def from_grpc(context, idx: int) -> bool:
    """gRPC ModelInfer requests carry no HTTP headers (TorchServe adds only the body's own type)."""
    return set(context.get_all_request_header(idx) or {}) <= {"body"}


def detect(value, content_type: str, grpc: bool):
    """The decoded body of an inference request, or None when the body is not one (a native request)."""
    if not grpc and body_kind(content_type) != "json":
        return None
    if isinstance(value, (bytes, bytearray)):
        try:
            value = json.loads(bytes(value).decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return None  # not JSON: the native parser answers it
    inputs = value.get("inputs") if isinstance(value, dict) else None
    # REST: a list of tensors (native JSON has strings there); gRPC: the frontend's own JSON
    if not isinstance(inputs, list) or not (all(isinstance(t, dict) for t in inputs) and inputs
                                            or grpc and "model_name" in value):
        return None
    return value


def _texts(tensor, grpc: bool, limit: int, what: str = "text") -> list[str]:
    """The strings of one BYTES input tensor."""
    if not isinstance(tensor, dict):
        raise RequestError(400, "each input must be a tensor object")
    data, shape = tensor.get("data"), tensor.get("shape")
    if tensor.get("datatype") != "BYTES":
        raise RequestError(400, f"input {tensor.get('name')!r}: datatype must be BYTES (texts), "
                                f"got {tensor.get('datatype')!r}")
    if not isinstance(data, list) or not data or not all(isinstance(t, str) for t in data):
        raise RequestError(400, 'input "data" must be a non-empty list of strings')
    if shape not in ([len(data)], [len(data), 1]):
        raise RequestError(400, f"input shape {shape} does not match {len(data)} texts: use [{len(data)}]")
    if len(data) > limit:
        raise RequestError(413, f"{len(data)} inputs in one request; the limit is {limit}")
    texts = [_grpc_text(t, i) for i, t in enumerate(data)] if grpc else data
    for i, text in enumerate(texts):
        if not text.strip():
            raise RequestError(400, f"{what} {i} is empty")
        check_unicode(text, f"{what} {i}")
    return texts


def _grpc_text(encoded: str, i: int) -> str:
    try:
        return base64.b64decode(encoded, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise RequestError(400, f"text {i} is not valid UTF-8") from None


def model_version(context) -> str:
    manifest = getattr(context, "manifest", None) or {}
    return str(manifest.get("model", {}).get("modelVersion") or "1.0")


def _output(name: str, shape: list[int], values) -> str:
    return f'{{"name":"{name}","datatype":"FP32","shape":{json.dumps(shape)},"data":{float32_json(values)}}}'


class OpenInferenceApi:
    """Embedding models: one BYTES input of n texts -> FP32 "embedding" [n, dim]. Classification models:
    BYTES inputs "query" [1] and "documents" [n] -> FP32 "scores" [n] (each document's relevance, in
    document order); one BYTES input of n texts -> FP32 "scores" [n, labels] (label probabilities, in
    label order)."""

    def parse(self, body: dict, content_type: str, model: ModelInfo, context, idx: int) -> EncoderRequest:
        grpc = from_grpc(context, idx)
        request_id = body.get("id") or ""
        request_id = request_id if isinstance(request_id, str) else json.dumps(request_id)
        request = EncoderRequest(adapter=self, options={"grpc": grpc, "id": request_id})
        try:
            self._read(request, body.get("inputs"), grpc, model)
        except RequestError as exc:  # answered in the protocol's shape, with the request's id
            request.fail(exc.status, str(exc))
        return request

    @staticmethod
    def _read(request: EncoderRequest, inputs: list, grpc: bool, model: ModelInfo) -> None:
        by_name = {t.get("name"): t for t in inputs if isinstance(t, dict)}
        if model.kind == "classification" and "query" in by_name:
            if set(by_name) != {"query", "documents"} or len(inputs) != 2:
                raise RequestError(400, 'a rerank request has two BYTES inputs, "query" [1] and "documents" [n]')
            queries = _texts(by_name["query"], grpc, 1, "query")
            docs = _texts(by_name["documents"], grpc, model.max_documents, "document")
            request.task, request.inputs = "rerank", [(queries[0], d) for d in docs]
            return
        if len(inputs) != 1:
            raise RequestError(400, f"expected one input tensor (BYTES texts), got {len(inputs)}")
        request.inputs = _texts(inputs[0], grpc, model.max_inputs)
        request.task = "classify" if model.kind == "classification" else "embed"

    def answer(self, request: EncoderRequest, model: ModelInfo, context, idx: int) -> str:
        vectors = request.vectors
        if request.task == "rerank":
            output = _output("scores", [len(vectors)], (scores.relevance(v) for v in vectors))
        elif request.task == "classify":
            rows = [scores.probabilities(v, model.labels or {}) for v in vectors]
            output = _output("scores", [len(rows), len(rows[0])], itertools.chain.from_iterable(rows))
        else:
            output = _output("embedding", [len(vectors), len(vectors[0])], itertools.chain.from_iterable(vectors))
        return (f'{{"id":{json.dumps(request.options["id"])},"model_name":{json.dumps(context.model_name)},'
                f'"model_version":{json.dumps(model_version(context))},"outputs":[{output}]}}')

    def error(self, request: EncoderRequest, model: ModelInfo, context, idx: int) -> str:
        grpc, request_id = request.options.get("grpc", False), request.options.get("id", "")
        return error_answer(context, idx, request.status, request.error, grpc, request_id)


def error_answer(context, idx: int, status: int, message: str, grpc: bool, request_id: str = "") -> str:
    if not grpc:
        return error_body(context, idx, status, {"error": message})
    context.set_response_content_type(idx, "application/json")
    return json.dumps({"id": request_id, "model_name": context.model_name, "model_version": model_version(context),
                       "outputs": [{"name": "error", "datatype": "BYTES", "shape": [1],
                                    "data": [f"{status}: {message}"]}]})
