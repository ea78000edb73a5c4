"""OpenAI's v1/completions and v1/chat/completions for generation models: request bodies ->
GenerationRequest, and the answers (a JSON object, or Server-Sent Events when "stream" is true).

Defaults are OpenAI's: temperature 1, top_p 1; max_tokens 16 for completions (as OpenAI and vLLM),
and for chat the handler's max_new_tokens, capped by the context. Fields OpenAI defines that this
server does not implement (n > 1, logprobs, echo, penalties, tools, JSON mode) are a 400 naming them,
never silently ignored. top_k is accepted as an extension (as vLLM does).

(Kept out of generation_handler.py: TorchServe requires a handler module to define exactly one class.)
"""

from __future__ import annotations

import json
import uuid

from handler.generation_requests import GenerationRequest
from handler.openai_api import CHAT, COMPLETIONS, created_now
from handler.request_parsing import RequestError, check_unicode
from tracer.engine.generator import Generator, SamplingParams
from tracer.errors import GenerationRequestError

COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "stop", "stream", "stream_options", "seed", "n",
          "user", "logprobs", "presence_penalty", "frequency_penalty"}
KEYS = {COMPLETIONS: COMMON | {"prompt", "echo", "suffix", "best_of"},
        CHAT: COMMON | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools", "tool_choice",
                        "parallel_tool_calls"}}
# a field at any of these values asks for nothing this server lacks
HARMLESS = {"n": (1, None), "logprobs": (None, False), "presence_penalty": (0, None), "frequency_penalty": (0, None),
            "echo": (False, None), "suffix": (None, ""), "best_of": (1, None), "top_logprobs": (None, 0),
            "tools": (None, []), "tool_choice": (None, "none"), "parallel_tool_calls": (None, False, True)}


def parse_openai_generation(path: str, body: dict, generator: Generator, default_max_new_tokens: int,
                            model_name: str) -> GenerationRequest:
    if unknown := sorted(set(body) - KEYS[path]):
        raise RequestError(400, f"unknown fields {unknown}")
    if unsupported := sorted(k for k, ok in HARMLESS.items() if k in body and body[k] not in ok):
        raise RequestError(400, f"not supported by this server: {unsupported}")
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise RequestError(400, 'not supported by this server: "response_format" other than {"type": "text"}')
    ids = _prompt_ids(path, body, generator)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, '"stream" must be true or false')
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise RequestError(400, '"stream_options" may hold only "include_usage"')
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        room = generator.max_context - len(ids)
        max_tokens = 16 if path == COMPLETIONS else max(1, min(default_max_new_tokens, room))
    try:
        params = SamplingParams(max_new_tokens=max_tokens, temperature=body.get("temperature", 1.0),
                                top_k=body.get("top_k", 0), top_p=body.get("top_p", 1.0), seed=body.get("seed"),
                                stop=stop)
        generator.check(ids, params)
    except GenerationRequestError as exc:
        raise RequestError(exc.status, str(exc)) from None
    prefix = "chatcmpl-" if path == CHAT else "cmpl-"
    return GenerationRequest(prompt=ids, params=params, stream=stream, route=path, model=model_name,
                             response_id=prefix + uuid.uuid4().hex, created=created_now(),
                             include_usage=bool(options.get("include_usage")))


def _prompt_ids(path: str, body: dict, generator: Generator) -> list[int]:
    try:
        if path == CHAT:
            return generator.encode(messages=_messages(body.get("messages")))
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:  # a batch of one prompt
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            vocab = len(generator.tokenizer) if generator.tokenizer is not None else None
            if vocab is not None and not all(0 <= t < vocab for t in prompt):
                raise RequestError(400, f"prompt token ids must be in 0..{vocab - 1}")
            return list(prompt)
        if not isinstance(prompt, str) or not prompt.strip():
            raise RequestError(400, '"prompt" must be a non-empty string or token-id array (one prompt per request)')
        check_unicode(prompt, "the prompt")
        return generator.encode(prompt=prompt)
    except GenerationRequestError as exc:
        raise RequestError(exc.status, str(exc)) from None


def _messages(messages) -> list[dict]:
    """Chat messages with string content (OpenAI's list of text parts is joined)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, '"messages" must be a non-empty list of {"role", "content"}')
    out = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                             and isinstance(p.get("text"), str) for p in content):
            content = "".join(p["text"] for p in content)
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(content, str):
            raise RequestError(400, 'each message must be {"role": str, "content": str or a list of text parts}')
        check_unicode(content, "a message")
        out.append({"role": m["role"], "content": content})
    return out


# ---- answers ------------------------------------------------------------------------------------
def _usage(request: GenerationRequest) -> dict:
    c = request.completion
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": len(c.token_ids),
            "total_tokens": c.prompt_tokens + len(c.token_ids)}


def _envelope(request: GenerationRequest, chunk: bool) -> dict:
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if request.route == CHAT else "text_completion"
    return {"id": request.response_id, "object": kind, "created": request.created, "model": request.model}


def _choice(request: GenerationRequest, text: str, finish_reason: str | None, chunk: bool) -> dict:
    if request.route == COMPLETIONS:
        return {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
    if not chunk:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
                "logprobs": None}
    delta = {"content": text} if request.sent_chunks else {"role": "assistant", "content": text}
    return {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}


def stream_event(request: GenerationRequest, text: str) -> str:
    """One Server-Sent Event carrying the new text."""
    event = {**_envelope(request, True), "choices": [_choice(request, text, None, True)]}
    request.sent_chunks += 1
    return f"data: {json.dumps(event)}\n\n"


def final_answer(request: GenerationRequest) -> str:
    """Not streamed: the whole completion. Streamed: the rest of the text with finish_reason, a usage
    event when stream_options.include_usage asked for it, then [DONE]."""
    c = request.completion
    if not request.stream:
        return json.dumps({**_envelope(request, False), "choices": [_choice(request, c.text or "", c.finish_reason,
                                                                            False)], "usage": _usage(request)})
    rest = (c.text or "")[len(request.streamed_text):]
    events = [{**_envelope(request, True), "choices": [_choice(request, rest, c.finish_reason, True)]}]
    if request.include_usage:
        events.append({**_envelope(request, True), "choices": [], "usage": _usage(request)})
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
