"""A small REST client for tpserve's models on TorchServe: Python's standard library only (no
torchserve, no requests), for machines that only call the server.

    from handler.rest_client import Client
    client = Client("http://127.0.0.1:8080")
    client.embed(["a text", "another"], model="minilm")          # [[...384 floats], [...]]
    client.rerank("a query", ["a document", "another"], model="reranker")  # [{"index", "score"}, ...]
    client.generate(prompt="The capital of France is", model="smollm2", max_new_tokens=8)
    for line in client.stream(messages=[{"role": "user", "content": "Hi"}], model="smollm2"):
        print(line["text"], end="")

    python -m handler.rest_client embed "some text" | generate "a prompt" [--url URL] [--model NAME]

A 4xx/5xx answer raises PredictionError(status, message); the server's message is kept.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import urllib.parse
from collections.abc import Iterator


class PredictionError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status, self.message = status, message


class Client:
    def __init__(self, url: str = "http://127.0.0.1:8080", timeout: float = 300, token: str | None = None) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url must be http(s)://host[:port], got {url!r}")
        self.scheme, self.host, self.port = parts.scheme, parts.hostname, parts.port
        self.timeout = timeout
        self.headers = {"Content-Type": "application/json"}
        if token:  # TorchServe's inference key, when token authorization is on
            self.headers["Authorization"] = f"Bearer {token}"

    def _connection(self) -> http.client.HTTPConnection:
        kind = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return kind(self.host, self.port, timeout=self.timeout)

    def _post(self, model: str, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        connection = self._connection()
        connection.request("POST", f"/predictions/{urllib.parse.quote(model)}", json.dumps(body), self.headers)
        response = connection.getresponse()
        if response.status != 200:
            raw = response.read().decode(errors="replace")
            connection.close()
            try:
                error = json.loads(raw).get("error", raw)
            except (ValueError, AttributeError):
                error = raw
            raise PredictionError(response.status, error if isinstance(error, str) else json.dumps(error))
        return connection, response

    def embed(self, texts: str | list[str], model: str = "minilm") -> list[float] | list[list[float]]:
        """One embedding for a string, a list of embeddings (in order) for a list."""
        connection, response = self._post(model, {"inputs": texts})
        try:
            return json.loads(response.read())
        finally:
            connection.close()

    def rerank(self, query: str, documents: list[str], model: str = "reranker", **options) -> list[dict]:
        """A reranker's [{"index", "score"}] for the documents, highest first (options: raw_scores,
        return_text, top_n)."""
        connection, response = self._post(model, {"query": query, "texts": documents, **options})
        try:
            return json.loads(response.read())
        finally:
            connection.close()

    def generate(self, prompt: str | None = None, messages: list[dict] | None = None, model: str = "smollm2",
                 **params) -> dict:
        """{"text", "token_ids", "finish_reason", "usage"}; params: max_new_tokens, temperature,
        top_k, top_p, seed, stop."""
        connection, response = self._post(model, _generation_body(prompt, messages, params))
        try:
            return json.loads(response.read())
        finally:
            connection.close()

    def stream(self, prompt: str | None = None, messages: list[dict] | None = None, model: str = "smollm2",
               **params) -> Iterator[dict]:
        """The JSON lines of a streamed generation as they arrive: {"token_id", "text"} per token,
        the last with finish_reason and usage."""
        connection, response = self._post(model, {**_generation_body(prompt, messages, params), "stream": True})
        try:
            while line := response.readline():
                if line.strip():
                    yield json.loads(line)
        finally:
            connection.close()


def _generation_body(prompt, messages, params) -> dict:
    if (prompt is None) == (messages is None):
        raise ValueError("give a prompt or messages")
    return {**({"prompt": prompt} if prompt is not None else {"messages": messages}), **params}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m handler.rest_client", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["embed", "generate"])
    parser.add_argument("text")
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--model", default=None, help="default: minilm (embed), smollm2 (generate)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    try:
        client = Client(args.url)
        if args.command == "embed":
            print(json.dumps(client.embed(args.text, args.model or "minilm")))
        else:
            for line in client.stream(args.text, model=args.model or "smollm2", max_new_tokens=args.max_new_tokens):
                print(line["text"], end="", flush=True)
            print()
    except (PredictionError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
