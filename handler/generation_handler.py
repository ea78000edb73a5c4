"""TorchServe handler: text generation from a tensor-parallel decoder traced by `python -m tracer`.

POST JSON {"prompt": ...} or {"messages": [...]} with optional sampling settings
(handler/generation_requests.py). Not streamed: {"text", "token_ids", "finish_reason", "usage"}.
With "stream": true, one JSON line per token as it is produced ({"token_id", "text"}: the new text),
sent as TorchServe intermediate responses (chunked over REST, StreamPredictions over gRPC); the last
line carries finish_reason and usage. OpenAI's v1/completions, v1/chat/completions (streamed as
Server-Sent Events) and v1/models under /predictions/NAME/1.0/ (handler/openai_generation.py).
The requests of one TorchServe batch generate together, one
cache row each; a finished row stops costing. A request can fail only itself: bad input is its own
4xx, and only a model failure answers 500 for the batch it ran in.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from ts.handler_utils.utils import send_intermediate_predict_response
from ts.torch_handler.base_handler import BaseHandler

from handler import openai_api
from handler.generation_requests import GenerationRequest, answer, parse_generation
from handler.openai_api import CHAT, COMPLETIONS, MODELS, NATIVE
from handler.openai_generation import final_answer, parse_openai_generation, stream_event
from handler.request_parsing import RequestError, request_body
from handler.worker_threads import threads_per_rank
from tracer.engine.generator import Generator
from tracer.errors import ArtifactError, last_line

logger = logging.getLogger(__name__)
STREAM_TYPE = "application/jsonl"
EVENT_STREAM_TYPE = "text/event-stream"


class GenerationHandler(BaseHandler):
    def initialize(self, context) -> None:
        started = time.time()
        os.environ["TS_DECODE_INPUT_REQUEST"] = "false"  # bodies are parsed per request (a 4xx each)
        config = getattr(context, "model_yaml_config", None) or {}
        settings = config.get("handler", {})
        executor = "torchrun" if config.get("parallelType") == "tp" and "torchrun" in config else "threads"
        model_dir = Path(context.system_properties["model_dir"])
        threads = threads_per_rank(config)
        try:
            self.generator = Generator(model_dir, tp_degree=settings.get("tp_degree"), executor=executor,
                                       threads_per_rank=threads)
        except ArtifactError as exc:
            logger.error("tpserve: refusing to load %s: %s: %s", model_dir.name, type(exc).__name__, exc)
            raise
        self.max_new_tokens = int(settings.get("max_new_tokens", 256))
        self.generator.warm_up()
        self.created = openai_api.created_now()
        logger.info("tpserve: loaded generation tp=%d batch=%d context=%d executor=%s threads/rank=%d in %.1fs",
                    self.generator.model.tp_degree, self.generator.max_batch, self.generator.max_context, executor,
                    threads, time.time() - started)
        self.initialized = True

    def _is_explain(self) -> bool:
        return False

    def preprocess(self, data) -> list[GenerationRequest]:
        requests = []
        for idx, row in enumerate(data):
            path = openai_api.route(self.context, idx)
            try:
                openai_api.check_route(path, (COMPLETIONS, CHAT))
                value, content_type = request_body(self.context, idx, row)
                if path == NATIVE:
                    request = parse_generation(value, content_type, self.generator, self.max_new_tokens)
                elif path == MODELS:
                    request = GenerationRequest(route=MODELS)
                else:
                    body = openai_api.read_json(value, content_type)
                    request = parse_openai_generation(path, body, self.generator, self.max_new_tokens,
                                                      self.context.model_name)
            except RequestError as exc:
                request = GenerationRequest(route=path)
                request.fail(exc.status, str(exc))
            except Exception as exc:  # noqa: BLE001 - one odd request must not fail its batch
                logger.warning("tpserve: request %d unreadable: %s", idx, last_line(exc))
                request = GenerationRequest(route=path)
                request.fail(400, f"could not read the request ({type(exc).__name__})")
            requests.append(request)
        return requests

    def inference(self, requests: list[GenerationRequest], *args, **kwargs) -> list[GenerationRequest]:
        good = [(idx, r) for idx, r in enumerate(requests) if r.status == 200 and r.prompt is not None]
        if not good:
            return requests

        def on_token(row: int, token: int | None, completion) -> None:
            idx, request = good[row]
            if token is not None:
                request.tokens.append(token)
            if not request.stream:
                return
            if completion is not None:  # the last line goes out as the final response
                request.last_token = token
                return
            text = self.generator.tokenizer.decode(request.tokens, skip_special_tokens=True)
            delta = "" if text.endswith("\ufffd") else text[len(request.streamed_text):]  # "": half a character
            if request.route == NATIVE:
                self._send(idx, json.dumps({"token_id": token, "text": delta}) + "\n", STREAM_TYPE)
            elif delta:
                self._send(idx, stream_event(request, delta), EVENT_STREAM_TYPE)
            request.streamed_text += delta

        try:
            completions = self.generator.generate([r.prompt for _, r in good], [r.params for _, r in good], on_token)
        except Exception as exc:  # noqa: BLE001 - the model failed: 500 for this batch, the worker lives on
            for _, request in good:
                request.fail(500, f"model error: {last_line(exc)}")
            return requests
        for (_, request), completion in zip(good, completions, strict=True):
            request.completion = completion
        return requests

    def _send(self, idx: int, chunk: str, content_type: str) -> None:
        self.context.set_response_content_type(idx, content_type)
        answers = [None] * (idx + 1)
        answers[idx] = chunk
        send_intermediate_predict_response(answers, {idx: self.context.request_ids[idx]}, "Intermediate response",
                                           200, self.context)

    def postprocess(self, requests: list[GenerationRequest]) -> list[str]:
        answers = []
        for idx, request in enumerate(requests):
            if request.status == 200 and request.route != NATIVE:
                answers.append(self._openai_answer(idx, request))
            elif request.status == 200:
                body = answer(request)
                if request.stream:  # the last line: what is left of the text, then finish_reason and usage
                    body = {"token_id": request.last_token,
                            "text": (request.completion.text or "")[len(request.streamed_text):],
                            "finish_reason": body["finish_reason"], "usage": body["usage"]}
                answers.append(json.dumps(body) + ("\n" if request.stream else ""))
                self.context.set_response_content_type(idx, STREAM_TYPE if request.stream else "application/json")
            else:
                answers.append(openai_api.route_error(self.context, idx, request.route, request.status,
                                                      request.error))
        return answers

    def _openai_answer(self, idx: int, request: GenerationRequest) -> str:
        if request.route == MODELS:
            self.context.set_response_content_type(idx, "application/json")
            return openai_api.models_answer(self.context.model_name, self.created)
        self.context.set_response_content_type(idx, EVENT_STREAM_TYPE if request.stream else "application/json")
        return final_answer(request)
