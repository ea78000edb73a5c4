"""TorchServe handler: text generation from a tensor-parallel decoder traced by `python -m tracer`.

POST JSON {"prompt": ...} or {"messages": [...]} with optional sampling settings
(handler/generation_requests.py). Not streamed: {"text", "token_ids", "finish_reason", "usage"}.
With "stream": true, one JSON line per token as it is produced ({"token_id", "text"}: the new text;
chunked over REST, StreamPredictions over gRPC); the last line carries finish_reason and usage.
OpenAI's v1/completions, v1/chat/completions (streamed as Server-Sent Events) and v1/models under
/predictions/NAME/1.0/ (handler/openai_generation.py). A request can fail only itself: bad input
is its own 4xx; a model failure answers 500 for the requests it ran.

Two ways to batch, chosen when the model is archived (`--continuous-batching`):
- whole batches (default): the requests of one TorchServe batch generate together, one cache row
  each, until the last finishes; a finished row stops costing; streamed tokens go out as TorchServe
  intermediate responses. Requests arriving meanwhile wait for the next batch.
- continuous batching (TorchServe's `continuousBatching`): every call of the handler is one
  generation step. TorchServe passes the requests still running (known by their ids, sent without a
  body) and the new ones, up to batchSize = the traced cache rows; new requests join (prefill into a
  free cache row, first token) and the running ones get their next token. Each request answers
  every step with its new text (streamed) or nothing (not streamed), and the whole answer when it
  finishes. TorchServe drops a request whose client has gone away after its next chunk; missing from
  the next call, its generation stops and its cache row is free. Costs a TorchServe round trip per
  token, and TorchServe 0.12 ends a gRPC stream after its first chunk here (GRPCJob.isOpen() is
  inverted), so a gRPC stream gets its whole answer as one message at the end.
A third, `--async-worker`, runs the steps in the worker itself: handler/async_generation_handler.py,
a subclass of this one.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from ts.handler_utils.utils import send_intermediate_predict_response
from ts.torch_handler.base_handler import BaseHandler

from handler import generation_metrics, openai_api
from handler.generation_requests import GenerationRequest, answer, native_logprobs, parse_generation
from handler.openai_api import CHAT, COMPLETIONS, MODELS, NATIVE
from handler.openai_generation import final_answer, parse_openai_generation, stream_event
from handler.request_parsing import RequestError, request_body
from handler.timings import Timings
from handler.worker_threads import threads_per_rank
from tracer.engine.generator import Generator
from tracer.engine.running_batch import RunningBatch
from tracer.errors import ArtifactError, GenerationRequestError, last_line

logger = logging.getLogger(__name__)
STREAM_TYPE = "application/jsonl"
PREFILL_CHUNK = 256
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
                                       threads_per_rank=threads,
                                       prefix_caching=bool(settings.get("prefix_caching", True)))
        except ArtifactError as exc:
            logger.error("tpserve: refusing to load %s: %s: %s", model_dir.name, type(exc).__name__, exc)
            raise
        self.max_new_tokens = int(settings.get("max_new_tokens", 256))
        self.generator.prompt_lookup = bool(settings.get("prompt_lookup", self.generator.prompt_lookup))
        self.continuous = bool(config.get("continuousBatching"))
        self.generator.warm_up()
        # continuous batching: a prompt prefilled this many tokens per step, so a long one does not stall
        # the running streams for its whole prefill (0: whole prompts at once)
        self.batch = RunningBatch(self.generator, chunk=int(settings.get("prefill_chunk", PREFILL_CHUNK)) or None)
        self.capacity = self.generator.max_batch * self.generator.max_context  # KV cache positions
        self.running: dict[str, GenerationRequest] = {}  # TorchServe request id -> its request
        self.closing: dict[str, GenerationRequest] = {}  # answered over REST in one chunk, to end next step
        self.created = openai_api.created_now()
        self.timings = Timings()
        logger.info("tpserve: loaded generation tp=%d batch=%d context=%d executor=%s threads/rank=%d%s%s in %.1fs",
                    self.generator.model.tp_degree, self.generator.max_batch, self.generator.max_context, executor,
                    threads, " continuous batching" if self.continuous else "",
                    " prefix caching" if self.generator.prefix.enabled else "", time.time() - started)
        self.initialized = True

    def _is_explain(self) -> bool:
        return False

    def handle(self, data, context):
        return self.timings.around(super().handle, data, context)

    def preprocess(self, data) -> list[GenerationRequest]:
        requests = []
        for idx, row in enumerate(data):
            request_id = self.context.request_ids[idx]
            if request_id in self.running or request_id in self.closing:  # seen in an earlier step
                requests.append(self.running.get(request_id) or self.closing[request_id])
                continue
            path = openai_api.route(self.context, idx)
            with self.timings.phase("parse", idx):
                request = self._parse(idx, row, path)
            request.id = request_id
            request.arrived = time.monotonic()
            request.grpc = isinstance(row, dict) and "json" in row
            requests.append(request)
        return requests

    def _parse(self, idx: int, row, path: str) -> GenerationRequest:
        """Request idx, checked and tokenized (chat template applied), or failed with its 4xx."""
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
        return request

    def inference(self, requests: list[GenerationRequest], *args, **kwargs) -> list[GenerationRequest]:
        with self.timings.phase("model"):  # whole batches: the whole generation, streamed lines included
            return self._step(requests) if self.continuous else self._whole_batch(requests)

    def postprocess(self, requests: list[GenerationRequest]) -> list[str | None]:
        with self.timings.phase("answer"):
            if self.continuous:
                return self._step_answers(requests)
            return [self._answer(idx, request, finished=True) for idx, request in enumerate(requests)]

    # ---- whole batches ---------------------------------------------------------------------------
    def _whole_batch(self, requests: list[GenerationRequest]) -> list[GenerationRequest]:
        good = [(idx, r) for idx, r in enumerate(requests) if r.status == 200 and r.prompt is not None]
        if not good:
            return requests

        def on_token(row: int, token: int | None, completion, logprob) -> None:
            idx, request = good[row]
            generation_metrics.first_token(self.context, request)
            if logprob is not None:
                request.logprobs.append(logprob)
            request.new_tokens = [] if token is None else [token]
            request.tokens += request.new_tokens
            if request.stream and completion is None:  # the last line goes out as the final response
                chunk = self._answer(idx, request, finished=False)
                if chunk is not None:
                    answers = [None] * (idx + 1)
                    answers[idx] = chunk
                    send_intermediate_predict_response(answers, {idx: self.context.request_ids[idx]},
                                                       "Intermediate response", 200, self.context)

        generation_metrics.occupancy(self.context, len(good), sum(len(r.prompt) for _, r in good), self.capacity)
        try:
            completions = self.generator.generate([r.prompt for _, r in good], [r.params for _, r in good], on_token)
        except Exception as exc:  # noqa: BLE001 - the model failed: 500 for this batch, the worker lives on
            for _, request in good:
                request.fail(500, f"model error: {last_line(exc)}")
            return requests
        finally:
            generation_metrics.occupancy(self.context, 0, 0, self.capacity)
        for (_, request), completion in zip(good, completions, strict=True):
            request.completion = completion
            generation_metrics.finished(self.context, request)
        return requests

    # ---- continuous batching ---------------------------------------------------------------------
    def _step(self, requests: list[GenerationRequest]) -> list[GenerationRequest]:
        present = {request.id for request in requests}
        self.closing = {k: r for k, r in self.closing.items() if k in present}
        for request_id in [k for k in self.running if k not in present]:  # TorchServe dropped it: client gone
            request = self.running.pop(request_id)
            self.batch.leave(request_id)
            logger.info("tpserve: request %s stopped after %d tokens: its client went away", request_id,
                        len(request.tokens))
        running = [r for r in requests if r.id in self.running]
        for request in requests:  # the new ones join: each prefilled into a free cache row
            if (request.id in self.running or request.id in self.closing or request.status != 200
                    or request.prompt is None):
                continue
            try:
                self.batch.join(request.id, request.prompt, request.params)
                self.running[request.id] = request
            except GenerationRequestError as exc:
                request.fail(exc.status, str(exc))
            except Exception as exc:  # noqa: BLE001 - the model failed: 500 for this request, the worker lives on
                request.fail(500, f"model error: {last_line(exc)}")
        try:
            self.batch.step([r.id for r in running])
        except Exception as exc:  # noqa: BLE001 - 500 for the requests of this step, the worker lives on
            for request in running:
                request.fail(500, f"model error: {last_line(exc)}")
        for request in requests:
            if request.id in self.running:
                row = self.batch.rows[request.id]
                if not self.batch.prefilling(request.id):
                    generation_metrics.first_token(self.context, request)
                request.new_tokens = row.generated[len(request.tokens):]
                request.tokens = list(row.generated)
                request.logprobs = row.logprobs
                if request.status != 200 or row.finish is not None:
                    request.completion = self.batch.completion(request.id)
                    self.running.pop(request.id)
                    self.batch.leave(request.id, failed=request.status != 200)
                    generation_metrics.finished(self.context, request)
        rows = self.batch.rows.values()
        generation_metrics.occupancy(self.context, len(rows), sum(len(r.prompt) + len(r.generated) for r in rows),
                                     self.capacity)
        return requests

    def _step_answers(self, requests: list[GenerationRequest]) -> list[str | None]:
        """This step's answer of each request that has something to send; the others (not streamed,
        still running) are taken out of this step's response. context.stopping_criteria tells
        TorchServe which requests are done (True), go on (False) or neither (None: no ts_stream_next
        header, a plain HTTP response). TorchServe 0.12 over REST: a first answer marked done is sent
        without its HTTP headers, and an error status closes the connection after the headers, so a
        whole answer in one chunk goes out marked "go on" and is ended by an empty chunk the step
        after, and an error goes out as a plain response (TorchServe then drops the request once its
        connection has closed; until then it gets empty answers). A gRPC call may end with its first
        answer (unary Predictions ends there anyway)."""
        answers, done = [], {}
        for idx, request in enumerate(requests):
            if request.id in self.closing:
                answers.append("")
                done[idx] = None if request.status != 200 else True
                if request.status == 200:
                    del self.closing[request.id]
                continue
            finished = request.status != 200 or request.route == MODELS or request.completion is not None
            if request.grpc and request.stream and not finished:
                answers.append(None)  # see the module's docstring: one message at the end
                continue
            answers.append(self._answer(idx, request, finished))
            if answers[-1] is not None and finished and not request.answered and not request.grpc:
                finished = None if request.status != 200 else False
                self.closing[request.id] = request
            request.answered = request.answered or answers[-1] is not None
            done[idx] = finished
        for idx, answer_now in enumerate(answers):
            if answer_now is None:
                self.context.request_ids.pop(idx)  # nothing to send for it this step
        self.context.stopping_criteria = {idx: (lambda _, stop=stop: stop) for idx, stop in done.items()}
        return answers

    # ---- answers ---------------------------------------------------------------------------------
    def _answer(self, idx: int, request: GenerationRequest, finished: bool, context=None) -> str | None:
        """Request idx's answer: the whole of it when finished, else its new text when streamed (None:
        nothing to send now). context: the request's own (the async handler's), else the call's."""
        context = context or self.context
        if request.status != 200:
            return openai_api.route_error(context, idx, request.route, request.status, request.error)
        if request.route == MODELS:
            context.set_response_content_type(idx, "application/json")
            return openai_api.models_answer(context.model_name, self.created)
        if request.route != NATIVE:
            context.set_response_content_type(idx, EVENT_STREAM_TYPE if request.stream else "application/json")
            if finished:
                return final_answer(request, self.generator.tokenizer)
            if request.tools is not None:  # a tool call goes out whole, at the end
                return None
            delta = self._delta(request)
            return stream_event(request, delta, self.generator.tokenizer) if request.stream and delta else None
        context.set_response_content_type(idx, STREAM_TYPE if request.stream else "application/json")
        if finished:
            body = answer(request)
            if request.stream:  # the last line: what is left of the text, then finish_reason and usage
                body = {"token_id": request.new_tokens[-1] if request.new_tokens else None,
                        "text": (request.completion.text or "")[len(request.streamed_text):],
                        "finish_reason": body["finish_reason"], "usage": body["usage"],
                        **self._line_logprobs(request)}
            return json.dumps(body) + ("\n" if request.stream else "")
        if not request.stream or not request.new_tokens:  # nothing new (a prompt still being prefilled)
            return None
        delta = self._delta(request)
        return json.dumps({"token_id": request.new_tokens[-1] if request.new_tokens else None, "text": delta,
                           **self._line_logprobs(request)}) + "\n"

    @staticmethod
    def _line_logprobs(request: GenerationRequest) -> dict:
        """A streamed line's "logprobs": its tokens' (when the request asked)."""
        return {} if request.params.logprobs is None else {"logprobs": native_logprobs(request.new_logprobs())}

    def _delta(self, request: GenerationRequest) -> str:
        """The text the new tokens add ("" while they end in half a character)."""
        text = self.generator.tokenizer.decode(request.tokens, skip_special_tokens=True)
        delta = "" if text.endswith("\ufffd") else text[len(request.streamed_text):]
        request.streamed_text += delta
        return delta
