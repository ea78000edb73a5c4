"""Structured output: a generated row's tokens constrained to a grammar (any JSON, or a JSON schema) by
xgrammar, a maintained engine (vLLM's default): before each sampling, the tokens that cannot continue
a valid answer get -inf; after it, the matcher takes the token; the end-of-sequence token is allowed
only where the answer is complete.

Why xgrammar and not llguidance (both on the package index), measured on SmolLM2's 49,152-token
vocabulary (bench.grammar_engines): with compact JSON, as served, the two cost the same on average
(filling and applying a mask: 82 vs 88 us a token over an object with a 60-word string), xgrammar's
worst token less (0.45 vs 1.75 ms); with free whitespace llguidance's masks inside strings took up to
17 ms (1 ms on average, xgrammar 0.2).
"""

from __future__ import annotations

import functools
import json
import re

import torch

from ..errors import GenerationRequestError

MAX_SCHEMA_BYTES = 65_536       # a schema's JSON text
MAX_SCHEMA_NODES = 2_000        # objects in it (properties, items, ...): compile time grows with them


def check_schema(schema, what: str = "the JSON schema") -> str:
    """The schema as JSON text, or GenerationRequestError (400) naming what is wrong with it."""
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, dict):
        raise GenerationRequestError(f"{what} must be a JSON object")
    text = json.dumps(schema)
    if len(text) > MAX_SCHEMA_BYTES:
        raise GenerationRequestError(f"{what} has {len(text)} bytes; the limit is {MAX_SCHEMA_BYTES}")
    nodes = _count_objects(schema)
    if nodes > MAX_SCHEMA_NODES:
        raise GenerationRequestError(f"{what} has {nodes} objects; the limit is {MAX_SCHEMA_NODES}")
    for pattern in _patterns(schema):  # xgrammar compiles a bad one lazily: say so now
        try:
            re.compile(pattern)
        except re.error as exc:
            raise GenerationRequestError(
                f"{what}: pattern {pattern!r} is not a valid regular expression ({exc})") from None
    return text


def _patterns(value):
    if isinstance(value, dict):
        if isinstance(value.get("pattern"), str):
            yield value["pattern"]
        for v in value.values():
            yield from _patterns(v)
    elif isinstance(value, list):
        for v in value:
            yield from _patterns(v)


def _count_objects(value) -> int:
    if isinstance(value, dict):
        return 1 + sum(_count_objects(v) for v in value.values())
    if isinstance(value, list):
        return sum(_count_objects(v) for v in value)
    return 0


class Grammars:
    """Compiles grammars for one tokenizer (the tokenizer's table is built once, ~0.2 s, on first use;
    compiled grammars are cached by xgrammar)."""

    def __init__(self, tokenizer, vocab_size: int, eos: list[int]) -> None:
        self.tokenizer, self.vocab_size, self.eos = tokenizer, vocab_size, eos

    @functools.cached_property
    def _compiler(self):
        import xgrammar

        info = xgrammar.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                       stop_token_ids=self.eos or None)
        return xgrammar.GrammarCompiler(info, cache_enabled=True)

    def json_object(self):
        """Any JSON object (OpenAI's response_format {"type": "json_object"})."""
        return self.json_schema({"type": "object"}, "JSON")

    def json_schema(self, schema, what: str = "the JSON schema"):
        """Compact JSON (no whitespace between tokens: a small model left free to add some can loop on
        it, and it costs tokens), fields in the schema's order."""
        text = check_schema(schema, what)
        return self._compile(lambda c: c.compile_json_schema(text, any_whitespace=False, strict_mode=True), what)

    def _compile(self, compile_with, what: str):
        if self.tokenizer is None:
            raise GenerationRequestError("this model has no tokenizer: structured output needs one")
        try:
            return compile_with(self._compiler)
        except Exception as exc:  # noqa: BLE001 - xgrammar's errors name the problem; a 400, never unconstrained
            message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            message = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", message)  # the C++ source's time and line
            raise GenerationRequestError(f"{what} is not supported or not valid: {message}") from None


class Constraint:
    """One row's matcher and mask."""

    def __init__(self, compiled) -> None:
        import xgrammar

        self._xgr = xgrammar
        self.matcher = xgrammar.GrammarMatcher(compiled)
        self.mask = xgrammar.allocate_token_bitmask(1, compiled.tokenizer_info.vocab_size)

    def masked(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits with every token the grammar forbids next at -inf (a copy)."""
        logits = logits.float().cpu().clone().view(1, -1)
        self.matcher.fill_next_token_bitmask(self.mask)
        self._xgr.apply_token_bitmask_inplace(logits, self.mask)
        return logits[0]

    def accept(self, token: int) -> None:
        if not self.matcher.accept_token(token):  # the mask allows only accepted tokens: a bug if reached
            raise RuntimeError(f"the grammar refused token {token}")
