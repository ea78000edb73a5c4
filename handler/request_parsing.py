"""Request bodies -> texts, with a 4xx-class RequestError for anything malformed.

(Kept out of embedding_handler.py: TorchServe requires a handler module to define exactly one class.)
"""

from __future__ import annotations

import json


class RequestError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_texts(value, content_type: str, max_inputs: int) -> tuple[list[str], bool]:
    """(texts, answer_is_list) from one request body, or RequestError."""
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(400, "body is not valid UTF-8") from None
        if "json" in content_type:  # TorchServe could not parse it (REST), or gRPC's "json" input
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
    if any(not t.strip() for t in texts):
        raise RequestError(400, "empty text")
    return texts, as_list
