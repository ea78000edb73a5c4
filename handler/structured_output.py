"""OpenAI's response_format and tools for generation models, as grammars (tracer/engine/grammar.py):

- response_format {"type": "json_object"}: any JSON object; {"type": "json_schema", "json_schema":
  {"name", "schema", "strict"}}: that schema (always enforced, strict or not).
- tools + tool_choice, in a generic format (as llama.cpp's server does for chat templates without
  tool support, SmolLM2's among them): the tools and the answer's shape are described in the system
  prompt, and the answer is constrained to one JSON object, {"tool_call": {"name", "arguments"}} with
  one of the tools' names and its parameters' schema, or (tool_choice "auto") {"response": text}.
  "required" allows only a call, a named function only that one, "none" neither tools nor constraint.
  The answer's tool_call becomes OpenAI's message.tool_calls with finish_reason "tool_calls".
  Earlier turns' assistant tool_calls and role "tool" results are written back in the same format.

Every schema is compiled before the request runs: an invalid one is a 400 naming it.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from handler.request_parsing import RequestError
from tracer.errors import GenerationRequestError

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for a function's name
MAX_TOOLS = 128


@dataclass
class ToolPlan:
    """How a request's answer is read back: a tool call, or (auto) either."""

    choice: str          # "auto", "required" or "named"
    names: list[str]


def response_format_grammar(response_format, grammars):
    """The compiled grammar for OpenAI's response_format, or None for plain text."""
    if response_format is None or response_format == {"type": "text"}:
        return None
    if not isinstance(response_format, dict):
        raise RequestError(400, '"response_format" must be an object with a "type"')
    kind = response_format.get("type")
    try:
        if kind == "json_object":
            return grammars.json_object()
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict) or "schema" not in spec:
                raise RequestError(400, '"response_format.json_schema" must be {"name", "schema", "strict"}')
            return grammars.json_schema(spec["schema"], '"response_format.json_schema.schema"')
    except GenerationRequestError as exc:
        raise RequestError(exc.status, str(exc)) from None
    raise RequestError(400, f'"response_format.type" must be "text", "json_object" or "json_schema", got {kind!r}')


def tool_plan(body: dict, messages: list[dict], grammars) -> tuple[list[dict], object | None, ToolPlan | None]:
    """(the messages with the tools described, the answer's grammar, how to read it back); the messages
    unchanged and no grammar when the request has no tools or tool_choice is "none"."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if not tools:
        if choice not in (None, "none"):
            raise RequestError(400, '"tool_choice" needs "tools"')
        return messages, None, None
    functions = _functions(tools)
    if choice is None or choice == "auto":
        mode, offered = "auto", functions
    elif choice == "required":
        mode, offered = "required", functions
    elif choice == "none":
        return messages, None, None
    elif (isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict)
          and choice["function"].get("name") in {f["name"] for f in functions}):
        mode, offered = "named", [f for f in functions if f["name"] == choice["function"]["name"]]
    else:
        raise RequestError(400, '"tool_choice" must be "none", "auto", "required" or {"type": "function", '
                                '"function": {"name": one of the tools\' names}}')
    calls = [{"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
              "required": ["name", "arguments"], "additionalProperties": False} for f in offered]
    call = {"type": "object", "properties": {"tool_call": calls[0] if len(calls) == 1 else {"anyOf": calls}},
            "required": ["tool_call"], "additionalProperties": False}
    schema = call if mode != "auto" else {"anyOf": [call, {
        "type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"],
        "additionalProperties": False}]}
    try:
        grammar = grammars.json_schema(schema, "the tools' schema")
    except GenerationRequestError as exc:
        raise RequestError(exc.status, str(exc)) from None
    return _described(messages, functions, mode), grammar, ToolPlan(mode, [f["name"] for f in offered])


def _functions(tools) -> list[dict]:
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise RequestError(400, f'"tools" must be a list of at most {MAX_TOOLS} '
                                '{"type": "function", "function": ...}')
    out = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not NAME.match(name):
            raise RequestError(400, f'tools[{i}] must be {{"type": "function", "function": {{"name": '
                                    '[A-Za-z0-9_-]{1,64}, "description", "parameters"}}')
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise RequestError(400, f"tools[{i}].function.parameters must be a JSON schema object")
        description = function.get("description", "")
        if not isinstance(description, str):
            raise RequestError(400, f"tools[{i}].function.description must be a string")
        out.append({"name": function["name"], "description": description, "parameters": parameters})
    if len({f["name"] for f in out}) != len(out):
        raise RequestError(400, "two tools have the same name")
    return out


def _described(messages: list[dict], functions: list[dict], mode: str) -> list[dict]:
    listing = "\n".join(json.dumps(f) for f in functions)
    ask = ('To call a tool, answer with one JSON object {"tool_call": {"name": <the tool\'s name>, "arguments": '
           '<its arguments>}}')
    ask += (', or to answer directly, {"response": <your answer>}.' if mode == "auto" else ".")
    text = f"You can use these tools:\n{listing}\n{ask}"
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{text}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def tool_turn(message: dict) -> str | None:
    """An earlier assistant turn's tool_calls written back as the answer it was, or None."""
    calls = message.get("tool_calls")
    if not calls:
        return None
    if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("function"), dict)
                                              for c in calls):
        raise RequestError(400, 'an assistant message\'s "tool_calls" must be a list of {"id", "type", "function"}')
    out = []
    for call in calls:
        arguments = call["function"].get("arguments", "{}")
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        except json.JSONDecodeError:
            raise RequestError(400, "a tool call's arguments are not valid JSON") from None
        out.append(json.dumps({"tool_call": {"name": call["function"].get("name"), "arguments": arguments}}))
    return "\n".join(out)


def tool_result(message: dict, content: str) -> str:
    return json.dumps({"tool_response": {"tool_call_id": message.get("tool_call_id"), "content": content}})


def read_answer(text: str, plan: ToolPlan) -> tuple[str | None, list[dict] | None]:
    """(content, tool_calls) of a constrained answer; an unfinished one (cut by max_tokens) as text."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        try:  # an "auto" answer's text cut by max_tokens: the text so far
            return json.loads(text + '"}')["response"], None
        except (json.JSONDecodeError, KeyError, TypeError):
            return text, None
    if "tool_call" in value:
        call = value["tool_call"]
        return None, [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                       "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])}}]
    return value.get("response", text), None
