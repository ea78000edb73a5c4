"""Request bodies -> texts, with a 4xx-class RequestError for anything malformed; and what every
route's answer shares (error status and body, float32 vectors as JSON).

What each Content-Type means (TorchServe passes the body through undecoded; see
EmbeddingHandler.initialize):
  text/* (charset utf-8 or none), or no Content-Type   the body is one text
  application/json, application/*+json                 {"inputs": "text"} or {"inputs": ["t1", ...]}
  anything else                                        415, naming the right header
application/x-www-form-urlencoded is what `curl --data` sends without -H: TorchServe decodes it into
form fields (a body without "=" arrives empty, "+" and "%xx" are rewritten), so the text cannot be
recovered and the answer is 415, not a silently changed text.

(Kept out of embedding_handler.py: TorchServe requires a handler module to define exactly one class.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from http import HTTPStatus

USE_INSTEAD = "send text with 'Content-Type: text/plain' or JSON with 'Content-Type: application/json'"


@dataclass
class ParsedRequest:
    """One request of the batch on its way through the handler: either token ids, or its error."""

    route: str = ""              # "" (native) or an OpenAI path, e.g. "v1/embeddings"
    ids: list[list[int]] | None = None
    as_list: bool = False
    encoding: str = "float"      # OpenAI's encoding_format
    v2: object = None            # an Open Inference Protocol request (handler/open_inference.py)
    truncated: bool = False
    vectors: list | None = None
    status: int = 200
    error: str = ""

    def fail(self, status: int, message: str) -> None:
        self.status, self.error = status, message


class RequestError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def request_body(context, idx: int, row) -> tuple[object, str]:
    """(body, Content-Type) of request `idx` of a TorchServe batch: gRPC's "json" input, or the REST
    body. Form bodies arrive as their decoded fields, without "body": body_kind refuses them (415)."""
    if isinstance(row, dict) and "json" in row:  # gRPC: {"json": b'{...}'}
        return row["json"], "application/json"
    content_type = header(context, idx, "Content-Type") or ""
    return (row.get("body", row.get("data", b"")) if isinstance(row, dict) else row), content_type


def header(context, idx: int, name: str) -> str | None:
    """A request header by name, in any case: HTTP names are case-insensitive, TorchServe's lookup is
    not (curl sends "Content-Type", httpx and so the openai client "content-type")."""
    value = context.get_request_header(idx, name)
    if value is None:
        wanted = name.lower()
        value = next((v for k, v in (context.get_all_request_header(idx) or {}).items() if k.lower() == wanted), None)
    return value.decode() if isinstance(value, bytes) else value


def check_unicode(text: str, what: str) -> None:
    """JSON may spell a lone surrogate ("\ud800"): valid JSON, but no tokenizer takes it -> 400."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(400, f"{what} is not valid Unicode (it holds a lone surrogate)") from None


def error_body(context, idx: int, status: int, body: dict) -> str:
    """Request `idx`'s error: the status with its standard reason phrase (TorchServe frames the
    phrase by its length in characters, so only ASCII is safe there), `body` as JSON."""
    context.set_response_status(status, HTTPStatus(status).phrase, idx=idx)
    context.set_response_content_type(idx, "application/json")
    return json.dumps(body)


def error_answer(context, idx: int, status: int, message: str) -> str:
    """A native route's error: {"error": message, "status": status}."""
    return error_body(context, idx, status, {"error": message, "status": status})


def decode_json(value):
    """A JSON body (bytes or already decoded), or RequestError 400."""
    if not isinstance(value, (bytes, bytearray)):
        return value
    try:
        return json.loads(bytes(value).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise RequestError(400, "body is not valid JSON") from None


def float32_json(values) -> str:
    """float32 values as a JSON list. 9 significant digits round-trip any float32 exactly;
    json.dumps would write the float64 repr (17 digits): 60 % more bytes, twice the time."""
    return "[" + ",".join(map("%.9g".__mod__, values)) + "]"


def body_kind(content_type: str) -> str:
    """'text' or 'json' for a Content-Type header value, else RequestError 415."""
    media, _, params = (content_type or "").partition(";")
    media = media.strip().lower()
    charset = next((p.split("=", 1)[1].strip().strip('"').lower() for p in params.split(";")
                    if p.strip().lower().startswith("charset=")), "utf-8")
    if charset not in ("utf-8", "utf8", "us-ascii", "ascii"):
        raise RequestError(415, f"charset {charset!r} is not accepted: bodies are UTF-8")
    if media == "application/json" or (media.startswith("application/") and media.endswith("+json")):
        return "json"
    if media == "" or media.startswith("text/"):
        return "text"
    if media in ("application/x-www-form-urlencoded", "multipart/form-data"):
        raise RequestError(415, f"Content-Type {media} is not accepted (curl --data sends it when no -H is "
                                f"given; TorchServe decodes it as form fields): {USE_INSTEAD}")
    raise RequestError(415, f"Content-Type {media} is not accepted: {USE_INSTEAD}")


def parse_texts(value, content_type: str, max_inputs: int) -> tuple[list[str], bool]:
    """(texts, answer_is_list) from one request body, or RequestError."""
    kind = body_kind(content_type)
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(400, "body is not valid UTF-8") from None
        if kind == "json":
            if not value.strip():
                raise RequestError(400, 'empty body: expected JSON {"inputs": "text" | ["text", ...]}')
            try:
                value = json.loads(value)
            except ValueError:
                raise RequestError(400, "body is not valid JSON") from None
    if isinstance(value, str):
        texts, as_list = [value], False
    elif isinstance(value, dict) and set(value) == {"inputs"}:
        inputs = value["inputs"]
        if isinstance(inputs, str):
            texts, as_list = [inputs], False
        elif isinstance(inputs, list) and inputs and all(isinstance(t, str) for t in inputs):
            texts, as_list = inputs, True
        else:
            raise RequestError(400, '"inputs" must be a string or a non-empty list of strings')
    else:
        raise RequestError(400, 'expected a text/plain body or JSON {"inputs": "text" | ["text", ...]}')
    if len(texts) > max_inputs:
        raise RequestError(413, f"{len(texts)} inputs in one request; the limit is {max_inputs}")
    for i, text in enumerate(texts):
        if not text.strip():
            # also what a GET gets: TorchServe hands the handler neither the method nor a body
            raise RequestError(400, "empty text" if as_list or len(texts) > 1 else
                               "empty text (POST a body: text/plain, or JSON {\"inputs\": ...})")
        check_unicode(text, f"text {i}")
    return texts, as_list
