"""Request bodies -> texts, with a 4xx-class RequestError for anything malformed; and what every
route's answer shares (error status and body, float32 vectors as JSON).

What each Content-Type means (TorchServe passes the body through undecoded; see
EncoderHandler.initialize):
  text/* (charset utf-8 or none), or no Content-Type   the body is one text
  application/json, application/*+json                 {"inputs": "text"} or {"inputs": ["t1", ...]}
  anything else                                        415, naming the right header
application/x-www-form-urlencoded is what `curl --data` sends without -H: TorchServe decodes it into
form fields (a body without "=" arrives empty, "+" and "%xx" are rewritten), so the text cannot be
recovered and the answer is 415, not a silently changed text.

(Kept out of encoder_handler.py: TorchServe requires a handler module to define exactly one class.)
"""

from __future__ import annotations

import json
from http import HTTPStatus

USE_INSTEAD = "send text with 'Content-Type: text/plain' or JSON with 'Content-Type: application/json'"


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


def decode_body(value, content_type: str):
    """A native body: the text of a text/* body, or the decoded value of a JSON one; RequestError (4xx)
    for a Content-Type we do not read, bytes that are not UTF-8 or JSON that does not parse."""
    kind = body_kind(content_type)
    if not isinstance(value, (bytes, bytearray)):
        return value
    try:
        value = bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError(400, "body is not valid UTF-8") from None
    if kind == "text":
        return value
    if not value.strip():
        raise RequestError(400, 'empty body: expected JSON {"inputs": "text" | ["text", ...]}')
    try:
        return json.loads(value)
    except ValueError:
        raise RequestError(400, "body is not valid JSON") from None


def check_texts(texts: list, what: str = "text") -> None:
    """Each text non-blank and valid Unicode, else RequestError 400."""
    for i, text in enumerate(texts):
        if not text.strip():
            raise RequestError(400, f"empty {what}" if len(texts) == 1 else f"empty {what} (input {i})")
        check_unicode(text, f"{what} {i}")


def parse_native(value, content_type: str, max_inputs: int, fields: tuple[str, ...] = (),
                 pairs: bool = False) -> tuple[list, bool, dict]:
    """(inputs, answer_is_list, the other JSON fields) of a native body: text/plain (one text), or
    {"inputs": "text" | [...], <fields>}; pairs=True: an input may also be [text, text] (a classifier's
    pair). RequestError for anything else."""
    value = decode_body(value, content_type)
    extras = {}
    if isinstance(value, str):
        texts, as_list = [value], False
    elif isinstance(value, dict) and "inputs" in value and set(value) <= {"inputs", *fields}:
        inputs, extras = value["inputs"], {k: v for k, v in value.items() if k != "inputs"}

        def one(x) -> bool:
            return isinstance(x, str) or pairs and isinstance(x, list) and len(x) == 2 and all(
                isinstance(t, str) for t in x)

        if isinstance(inputs, str):
            texts, as_list = [inputs], False
        elif isinstance(inputs, list) and inputs and all(map(one, inputs)):
            texts, as_list = [tuple(t) if isinstance(t, list) else t for t in inputs], True
        else:
            raise RequestError(400, '"inputs" must be a string or a non-empty list of strings'
                               + (" or [text, text] pairs" if pairs else ""))
    elif isinstance(value, dict) and "inputs" in value:
        raise RequestError(400, f"unknown fields {sorted(set(value) - {'inputs', *fields})}; known: "
                                f"{sorted({'inputs', *fields})}")
    else:
        raise RequestError(400, 'expected a text/plain body or JSON {"inputs": "text" | ["text", ...]}')
    if len(texts) > max_inputs:
        raise RequestError(413, f"{len(texts)} inputs in one request; the limit is {max_inputs}")
    if len(texts) == 1 and isinstance(texts[0], str) and not texts[0].strip() and not as_list:
        # also what a GET gets: TorchServe hands the handler neither the method nor a body
        raise RequestError(400, "empty text (POST a body: text/plain, or JSON {\"inputs\": ...})")
    check_texts([t for x in texts for t in (x if isinstance(x, tuple) else (x,))])
    return texts, as_list, extras


def parse_texts(value, content_type: str, max_inputs: int) -> tuple[list[str], bool]:
    """(texts, answer_is_list) from one native embedding body, or RequestError."""
    texts, as_list, _ = parse_native(value, content_type, max_inputs)
    return texts, as_list
