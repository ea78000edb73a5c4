"""Generation request bodies -> (prompt token ids, sampling settings, stream?), or a 4xx RequestError.

    {"prompt": "text"} or {"messages": [{"role": "user", "content": "..."}, ...]} (chat template),
    optional "max_new_tokens", "temperature" (0 = greedy), "top_p", "top_k", "seed",
    "stop" (a string or a list of strings), "stream" (true: one JSON line per token), "logprobs" (k in
    0..20: each token's log-probability and the k likeliest tokens'), "json_schema" (the answer follows
    it), "prompt_lookup" (true / false: draft tokens from the context, greedy only; default: the model's)

(Kept out of generation_handler.py: TorchServe requires a handler module to define exactly one class.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from handler.request_parsing import RequestError, body_kind, check_unicode, decode_json
from handler.structured_output import ToolPlan
from tracer.engine.generator import Completion, Generator, SamplingParams, TokenLogprob
from tracer.errors import GenerationRequestError

KEYS = {"prompt", "messages", "max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "logprobs",
        "json_schema", "prompt_lookup"}


@dataclass
class GenerationRequest:
    """One request of the batch on its way through the handler: its prompt, or its error."""

    prompt: list[int] | None = None
    params: SamplingParams | None = None
    stream: bool = False
    completion: Completion | None = None
    streamed_text: str = ""
    status: int = 200
    error: str = ""
    id: str = ""                   # TorchServe's request id: the request's key while it runs
    grpc: bool = False             # came over gRPC (else REST)
    answered: bool = False         # has sent a first answer (continuous batching answers every step)
    tokens: list[int] = field(default_factory=list)      # generated so far
    new_tokens: list[int] = field(default_factory=list)  # generated in this step (none after an EOS)
    route: str = ""                # "" (native) or an OpenAI path (handler/openai_generation.py)
    model: str = ""                # OpenAI answers: the served model's name, the response id, its time
    response_id: str = ""
    created: int = 0
    include_usage: bool = False    # OpenAI stream_options.include_usage
    sent_chunks: int = 0           # OpenAI streaming: events sent so far
    arrived: float = 0.0           # time.monotonic() when the worker read it; its first token's (metrics)
    first_token_at: float = 0.0
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of the tokens so far, when asked
    sent_logprobs: int = 0         # how many of them have gone out (streaming)
    tools: ToolPlan | None = None  # OpenAI chat with tools: the answer is read back as a tool call

    def new_logprobs(self) -> list[TokenLogprob]:
        """The log-probabilities not sent yet (each streamed event carries its tokens')."""
        out = self.logprobs[self.sent_logprobs:]
        self.sent_logprobs = len(self.logprobs)
        return out

    def fail(self, status: int, message: str) -> None:
        self.status, self.error = status, message


def parse_generation(value, content_type: str, generator: Generator, default_max_new_tokens: int) -> GenerationRequest:
    if body_kind(content_type) != "json":
        raise RequestError(415, "generation takes JSON: send it with 'Content-Type: application/json'")
    value = decode_json(value)
    if not isinstance(value, dict) or ("prompt" in value) == ("messages" in value):
        raise RequestError(400, 'expected JSON {"prompt": "text"} or {"messages": [{"role", "content"}, ...]}')
    if unknown := sorted(set(value) - KEYS):
        raise RequestError(400, f"unknown fields {unknown}; known: {sorted(KEYS)}")
    messages, prompt = value.get("messages"), value.get("prompt")
    if messages is not None and (not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages)):
        raise RequestError(400, '"messages" must be a non-empty list of {"role": str, "content": str}')
    if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
        raise RequestError(400, '"prompt" must be a non-empty string')
    for text in [prompt] if prompt is not None else [m["content"] for m in messages]:
        check_unicode(text, "the prompt")
    stop = value.get("stop", [])
    stream = value.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, '"stream" must be true or false')
    try:
        ids = generator.encode(prompt=prompt, messages=messages)
        schema = value.get("json_schema")
        grammar = generator.grammars.json_schema(schema, '"json_schema"') if "json_schema" in value else None
        params = SamplingParams(
            max_new_tokens=value.get("max_new_tokens", max(1, min(default_max_new_tokens,
                                                                  generator.max_context - len(ids)))),
            temperature=value.get("temperature", 0.0), top_k=value.get("top_k", 0), top_p=value.get("top_p", 1.0),
            seed=value.get("seed"), stop=[stop] if isinstance(stop, str) else stop, logprobs=value.get("logprobs"),
            grammar=grammar, prompt_lookup=value.get("prompt_lookup"))
        generator.check(ids, params)
    except GenerationRequestError as exc:
        raise RequestError(exc.status, str(exc)) from None
    return GenerationRequest(prompt=ids, params=params, stream=stream)


def answer(request: GenerationRequest) -> dict:
    c = request.completion
    out = {"text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason,
           "usage": {"prompt_tokens": c.prompt_tokens, "completion_tokens": len(c.token_ids),
                     "cached_tokens": c.cached_tokens}}
    if c.logprobs is not None:
        out["logprobs"] = native_logprobs(c.logprobs)
    return out


def native_logprobs(entries: list[TokenLogprob]) -> list[dict]:
    return [{"token_id": e.token, "logprob": e.logprob,
             "top_logprobs": [{"token_id": t, "logprob": lp} for t, lp in e.top]} for e in entries]
