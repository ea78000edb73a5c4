"""The Open Inference Protocol (KServe v2) for embedding models, as TorchServe 0.12 passes it on.

REST `POST /v2/models/NAME/infer` reaches the handler as the client's JSON body; gRPC `ModelInfer`
(open_inference_grpc.proto, package org.pytorch.serve.grpc.openinference) arrives as JSON the
frontend wrote, {"id", "model_name", "inputs": [...]}, with BYTES contents base64-encoded and no
HTTP headers at all. Either way the request is one BYTES input of n texts (shape [n] or [n, 1]) and
the answer is one FP32 output "embedding" of shape [n, dim] (data flat, row-major).

Errors: over REST the status and {"error": message}, as KServe v2 defines. Over gRPC TorchServe
ignores the status a handler sets, and an answer without id / model_name / model_version / outputs
makes the frontend restart the worker; so a bad gRPC request is answered with one BYTES output
named "error" holding the message (handler.grpc_client raises it as PredictionError).

(Kept out of embedding_handler.py: TorchServe requires a handler module to define exactly one class.)
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
from dataclasses import dataclass

from handler.request_parsing import RequestError, body_kind, check_unicode, error_body, float32_json

V2 = "v2"  # ParsedRequest.route of an Open Inference Protocol request


@dataclass
class V2Request:
    texts: list[str]
    request_id: str
    grpc: bool


def from_grpc(context, idx: int) -> bool:
    """gRPC ModelInfer requests carry no HTTP headers (TorchServe adds only the body's own type)."""
    return set(context.get_all_request_header(idx) or {}) <= {"body"}


class V2RequestError(RequestError):
    """A bad inference request: answered in the protocol's shape (see the module doc)."""

    def __init__(self, status: int, message: str, grpc: bool, request_id: str) -> None:
        super().__init__(status, message)
        self.request = V2Request([], request_id, grpc)


def parse_v2(value, content_type: str, grpc: bool, max_inputs: int) -> V2Request | None:
    """The texts of an inference request, None when the body is not one (a native request), or
    V2RequestError (400/413) when it is one this model cannot answer."""
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
    request_id = value.get("id") or ""
    request_id = request_id if isinstance(request_id, str) else json.dumps(request_id)
    try:
        return V2Request(_texts(inputs, grpc, max_inputs), request_id, grpc)
    except RequestError as exc:
        raise V2RequestError(exc.status, str(exc), grpc, request_id) from None


def _texts(inputs: list, grpc: bool, max_inputs: int) -> list[str]:
    if len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise RequestError(400, f"expected one input tensor (BYTES texts), got {len(inputs)}")
    tensor = inputs[0]
    data, shape = tensor.get("data"), tensor.get("shape")
    if tensor.get("datatype") != "BYTES":
        raise RequestError(400, f"input {tensor.get('name')!r}: datatype must be BYTES (texts), "
                                f"got {tensor.get('datatype')!r}")
    if not isinstance(data, list) or not data or not all(isinstance(t, str) for t in data):
        raise RequestError(400, 'input "data" must be a non-empty list of strings')
    if shape not in ([len(data)], [len(data), 1]):
        raise RequestError(400, f"input shape {shape} does not match {len(data)} texts: use [{len(data)}]")
    if len(data) > max_inputs:
        raise RequestError(413, f"{len(data)} inputs in one request; the limit is {max_inputs}")
    texts = [_grpc_text(t, i) for i, t in enumerate(data)] if grpc else data
    for i, text in enumerate(texts):
        if not text.strip():
            raise RequestError(400, f"text {i} is empty")
        check_unicode(text, f"text {i}")
    return texts


def _grpc_text(encoded: str, i: int) -> str:
    try:
        return base64.b64decode(encoded, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise RequestError(400, f"text {i} is not valid UTF-8") from None


def model_version(context) -> str:
    manifest = getattr(context, "manifest", None) or {}
    return str(manifest.get("model", {}).get("modelVersion") or "1.0")


def answer(request: V2Request, context, vectors: list[list[float]]) -> str:
    flat = float32_json(itertools.chain.from_iterable(vectors))
    output = (f'{{"name":"embedding","datatype":"FP32","shape":[{len(vectors)},{len(vectors[0])}],'
              f'"data":{flat}}}')
    return (f'{{"id":{json.dumps(request.request_id)},"model_name":{json.dumps(context.model_name)},'
            f'"model_version":{json.dumps(model_version(context))},"outputs":[{output}]}}')


def error_answer(context, idx: int, status: int, message: str, grpc: bool, request_id: str = "") -> str:
    if not grpc:
        return error_body(context, idx, status, {"error": message})
    context.set_response_content_type(idx, "application/json")
    return json.dumps({"id": request_id, "model_name": context.model_name, "model_version": model_version(context),
                       "outputs": [{"name": "error", "datatype": "BYTES", "shape": [1],
                                    "data": [f"{status}: {message}"]}]})
