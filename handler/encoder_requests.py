"""What the encoder handler and its protocol adapters pass between them.

A protocol adapter (handler/native_encoder_api.py, openai_api.py, rerank_api.py, open_inference.py)
turns one request's body into an EncoderRequest (parse: the task and its inputs, or a RequestError),
and the request, once the encoder has answered it, into the protocol's answer (answer / error). The
handler (encoder_handler.py) runs every request of a batch through the model together; nothing in an
adapter knows of batches, so "a request fails only itself" lives in one place.

    embed     inputs: texts or token-id arrays          -> vectors: one embedding each
    rerank    inputs: (query, document) pairs           -> vectors: each pair's logits
    classify  inputs: texts or (text, text) pairs       -> vectors: each input's logits

(Kept out of the handler module: TorchServe requires a handler module to define exactly one class.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class ModelInfo:
    """What an adapter needs to know of the served model."""

    name: str
    kind: str                        # "embedding" or "classification" (the manifest's)
    dimension: int | None            # an embedding's length
    labels: dict | None              # a classifier's {"id2label", "multi_label"}
    max_inputs: int                  # texts per request (embed, classify)
    max_documents: int               # documents per rerank request
    created: int                     # OpenAI's model list


@dataclass
class EncoderRequest:
    """One request of the batch on its way through the handler: its task and inputs, then its vectors
    or its error."""

    adapter: Any = None               # the protocol adapter that parsed it and writes its answer
    task: str = "embed"               # "embed", "rerank" or "classify"
    inputs: list = field(default_factory=list)
    prompt_name: str | None = None    # embed: a prompt of the model's sentence-transformers config
    options: dict = field(default_factory=dict)  # the protocol's own (as_list, encoding, top_n, ...)
    encoded: list | None = None       # the inputs tokenized (engine.embedder.Encoded)
    truncated: bool = False
    vectors: list | None = None
    status: int = 200
    error: str = ""

    def fail(self, status: int, message: str) -> None:
        self.status, self.error = status, message


class Adapter(Protocol):
    def parse(self, value, content_type: str, model: ModelInfo, context, idx: int) -> EncoderRequest:
        """The request's task and inputs, or RequestError (4xx)."""

    def answer(self, request: EncoderRequest, model: ModelInfo, context, idx: int) -> str:
        """The answer's body (request.vectors filled in)."""

    def error(self, request: EncoderRequest, model: ModelInfo, context, idx: int) -> str:
        """The error's body in the protocol's shape, with request.status set on the response."""
