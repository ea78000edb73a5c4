"""OpenAI's v1/completions and v1/chat/completions for generation models: request bodies ->
GenerationRequest, and the answers (a JSON object, or Server-Sent Events when "stream" is true).

Defaults are OpenAI's: temperature 1, top_p 1; max_tokens 16 for completions (as OpenAI and vLLM),
and for chat the handler's max_new_tokens, capped by the context. Fields OpenAI defines that this
server does not implement (n > 1, echo, penalties) are a 400 naming them, never silently ignored.
response_format and tools: handler/structured_output.py. top_k (as vLLM) and prompt_lookup (true /
false) are accepted as extensions. logprobs: chat's "logprobs": true with "top_logprobs" (0..20),
completions' "logprobs": k (0..20; OpenAI's own limit there is 5).

(Kept out of generation_handler.py: TorchServe requires a handler module to define exactly one class.)
"""

from __future__ import annotations

import json
import uuid

from handler.generation_requests import GenerationRequest
from handler.openai_api import CHAT, COMPLETIONS, created_now
from handler.request_parsing import RequestError, check_unicode
from handler.structured_output import read_answer, response_format_grammar, tool_plan, tool_result, tool_turn
from tracer.engine.generator import Generator, SamplingParams
from tracer.errors import GenerationRequestError

COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "stop", "stream", "stream_options", "seed", "n",
          "user", "logprobs", "presence_penalty", "frequency_penalty", "prompt_lookup"}
KEYS = {COMPLETIONS: COMMON | {"prompt", "echo", "suffix", "best_of"},
        CHAT: COMMON | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools", "tool_choice",
                        "parallel_tool_calls"}}
# a field at any of these values asks for nothing this server lacks
HARMLESS = {"n": (1, None), "presence_penalty": (0, None), "frequency_penalty": (0, None),
            "echo": (False, None), "suffix": (None, ""), "best_of": (1, None),
            "parallel_tool_calls": (None, False, True)}  # one call per answer either way


def parse_openai_generation(path: str, body: dict, generator: Generator, default_max_new_tokens: int,
                            model_name: str) -> GenerationRequest:
    if unknown := sorted(set(body) - KEYS[path]):
        raise RequestError(400, f"unknown fields {unknown}")
    if unsupported := sorted(k for k, ok in HARMLESS.items() if k in body and body[k] not in ok):
        raise RequestError(400, f"not supported by this server: {unsupported}")
    grammar = response_format_grammar(body.get("response_format"), generator.grammars)
    plan = None
    if path == CHAT:
        messages, tool_grammar, plan = tool_plan(body, _messages(body.get("messages")), generator.grammars)
        if tool_grammar is not None and grammar is not None:
            raise RequestError(400, '"tools" and a JSON "response_format" cannot be used together')
        grammar = grammar or tool_grammar
        try:
            ids = generator.encode(messages=messages)
        except GenerationRequestError as exc:
            raise RequestError(exc.status, str(exc)) from None
    else:
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
                                stop=stop, logprobs=_logprobs_asked(path, body), grammar=grammar,
                                prompt_lookup=body.get("prompt_lookup"))
        generator.check(ids, params)
    except GenerationRequestError as exc:
        raise RequestError(exc.status, str(exc)) from None
    prefix = "chatcmpl-" if path == CHAT else "cmpl-"
    return GenerationRequest(prompt=ids, params=params, stream=stream, route=path, model=model_name,
                             response_id=prefix + uuid.uuid4().hex, created=created_now(),
                             include_usage=bool(options.get("include_usage")), tools=plan)


def _logprobs_asked(path: str, body: dict) -> int | None:
    """How many top log-probabilities per token the request asks for (None: no logprobs)."""
    if path == COMPLETIONS:
        return body.get("logprobs")
    asked, top = body.get("logprobs"), body.get("top_logprobs")
    if asked not in (None, False, True):
        raise RequestError(400, '"logprobs" must be true or false')
    if top is not None and not asked:
        raise RequestError(400, '"top_logprobs" needs "logprobs": true')
    return (0 if top is None else top) if asked else None


def _prompt_ids(path: str, body: dict, generator: Generator) -> list[int]:
    try:
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
    """Chat messages with string content (OpenAI's list of text parts is joined; an assistant's
    tool_calls and a tool's result in the generic tools format)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, '"messages" must be a non-empty list of {"role", "content"}')
    out = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(m, dict) and m.get("role") == "assistant" and content is None:
            content = tool_turn(m)
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                             and isinstance(p.get("text"), str) for p in content):
            content = "".join(p["text"] for p in content)
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(content, str):
            raise RequestError(400, 'each message must be {"role": str, "content": str or a list of text parts}')
        check_unicode(content, "a message")
        out.append({"role": m["role"], "content": tool_result(m, content) if m["role"] == "tool" else content})
    return out


# ---- answers ------------------------------------------------------------------------------------
def _usage(request: GenerationRequest) -> dict:
    c = request.completion
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": len(c.token_ids),
            "total_tokens": c.prompt_tokens + len(c.token_ids),
            # as OpenAI reports its prompt caching: the prompt's tokens read from the prefix cache
            "prompt_tokens_details": {"cached_tokens": c.cached_tokens}}


def _envelope(request: GenerationRequest, chunk: bool) -> dict:
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if request.route == CHAT else "text_completion"
    return {"id": request.response_id, "object": kind, "created": request.created, "model": request.model}


def _choice(request: GenerationRequest, text: str, finish_reason: str | None, chunk: bool,
            tokenizer=None) -> dict:
    logprobs = _logprobs(request, tokenizer, text) if request.params.logprobs is not None else None
    if request.route == COMPLETIONS:
        return {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}
    message = {"role": "assistant", "content": text}
    if request.tools is not None and finish_reason is not None:  # the whole constrained answer, read back
        content, calls = read_answer(text, request.tools)
        message = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = calls
            finish_reason = "tool_calls"
    if not chunk:
        return {"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": logprobs}
    delta = dict(message)
    if request.sent_chunks:
        del delta["role"]
    if "tool_calls" in delta:  # streamed calls carry their index
        delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(delta["tool_calls"])]
    return {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}


def _logprobs(request: GenerationRequest, tokenizer, text: str) -> dict:
    """The tokens not yet sent, in OpenAI's shapes: chat's {"content": [{token, logprob, bytes,
    top_logprobs}]}, completions' {tokens, token_logprobs, top_logprobs, text_offset}. A token's text is
    its own decoding (a piece of a multi-byte character decodes to U+FFFD, as vLLM's)."""
    entries = request.new_logprobs()

    def piece(token: int) -> str:
        return tokenizer.decode([token]) if tokenizer is not None else str(token)

    if request.route == CHAT:
        def one(token: int, logprob: float) -> dict:
            text_of = piece(token)
            return {"token": text_of, "logprob": logprob, "bytes": list(text_of.encode("utf-8"))}
        return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                            for e in entries], "refusal": None}
    tokens = [piece(e.token) for e in entries]
    offsets, at = [], len(request.streamed_text) - len(text) if request.stream else 0
    for token in tokens:
        offsets.append(at)
        at += len(token)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{piece(t): lp for t, lp in e.top} for e in entries], "text_offset": offsets}


def stream_event(request: GenerationRequest, text: str, tokenizer=None) -> str:
    """One Server-Sent Event carrying the new text (and its tokens' logprobs, when asked)."""
    event = {**_envelope(request, True), "choices": [_choice(request, text, None, True, tokenizer)]}
    request.sent_chunks += 1
    return f"data: {json.dumps(event)}\n\n"


def final_answer(request: GenerationRequest, tokenizer=None) -> str:
    """Not streamed: the whole completion. Streamed: the rest of the text with finish_reason, a usage
    event when stream_options.include_usage asked for it, then [DONE]."""
    c = request.completion
    if not request.stream:
        return json.dumps({**_envelope(request, False), "choices": [_choice(
            request, c.text or "", c.finish_reason, False, tokenizer)], "usage": _usage(request)})
    rest = (c.text or "")[len(request.streamed_text):]
    events = [{**_envelope(request, True), "choices": [_choice(request, rest, c.finish_reason, True, tokenizer)]}]
    if request.include_usage:
        events.append({**_envelope(request, True), "choices": [], "usage": _usage(request)})
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
