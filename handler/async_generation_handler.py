"""TorchServe handler: generation on TorchServe's async worker (`asyncCommunication: true`,
ts/async_service.py), where the worker owns the generation loop.

TorchServe hands each request to `handle` (a coroutine on the worker's event loop) as it arrives,
while others run. The request is parsed there and submitted to the StepLoop (tracer/engine/step_loop.py),
which runs continuous batching on the thread that loaded the model: the request joins at the next step boundary, its
prompt is prefilled in pieces between steps, and its tokens stream out from that thread as TorchServe
intermediate responses the moment a step produces them; the coroutine returns the final answer. The
frontend is off the per-token path (continuous batching through TorchServe costs a round trip to it
per token). Everything else (routes, protocols, 4xx rules, answers, metrics) is the generation
handler's (handler/generation_handler.py), of which this is a subclass.

What TorchServe 0.12's async mode does not give: a way to learn that a client went away (its
frontend drops the response, the worker is not told), so a dropped stream generates until it ends;
and a per-request error must be an answer with its status, never an exception (an error status for
the call fails every request the worker is running).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import threading

from ts.handler_utils.utils import send_intermediate_predict_response

from handler import generation_metrics
from handler.generation_handler import GenerationHandler
from handler.generation_requests import GenerationRequest
from handler.openai_api import MODELS
from handler.worker_socket import OneWriterSocket
from tracer.engine.step_loop import StepLoop
from tracer.errors import GenerationRequestError, last_line


class AsyncGenerationHandler(GenerationHandler):
    def initialize(self, context) -> None:
        """Load and warm the model on the thread that then runs the step loop: all of the worker's
        model work on one thread (StepLoop.run says why)."""
        ready: concurrent.futures.Future = concurrent.futures.Future()

        def model_thread() -> None:
            try:
                GenerationHandler.initialize(self, context)
                self.loop = StepLoop(self.batch)
            except BaseException as exc:  # noqa: BLE001 - TorchServe reports it as the load's failure
                ready.set_exception(exc)
                return
            ready.set_result(None)
            self.loop.run()

        threading.Thread(target=model_thread, name="tpserve-step-loop", daemon=True).start()
        ready.result()

    async def handle(self, data, context):
        """TorchServe's async worker sends one request per call (batchSize 1): its answer, once done."""
        self.context = context  # for the parse, before any await: the requests' calls interleave
        if type(context.cl_socket) is socket.socket:
            context.cl_socket.__class__ = OneWriterSocket
        self.timings.begin(len(data))  # the parse's phases (not written: calls overlap here)
        requests = self.preprocess(data)
        answers = await asyncio.gather(*(self._run(idx, request, context) for idx, request in enumerate(requests)))
        return [self._final(idx, request, body, context) for idx, (request, body) in
                enumerate(zip(requests, answers, strict=True))]

    @staticmethod
    def _final(idx: int, request: GenerationRequest, body: str | None, context) -> str | None:
        """The call's answer for request idx, in the shape TorchServe 0.12's async frontend needs: it
        forgets a job only on a response marked ts_stream_next "false", and over REST a response so
        marked that is the first of its request goes out without its HTTP head. So a whole REST answer
        goes out as a streamed chunk and the call ends it with an empty one; an error stays a plain
        response (its status; the frontend keeps the job's entry); gRPC answers end the call as they are."""
        if request.status != 200:
            return body
        if not request.grpc and not request.answered:  # nothing of it has gone out yet
            _send(idx, body, context)
            body = ""
        context.set_response_header(idx, "ts_stream_next", "false")
        return body

    async def _run(self, idx: int, request: GenerationRequest, context) -> str | None:
        if request.status != 200 or request.route == MODELS or request.prompt is None:
            return self._answer(idx, request, finished=True, context=context)
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def on_step(row, error) -> None:  # on the step loop thread
            if error is not None:
                status = error.status if isinstance(error, GenerationRequestError) else 500
                request.fail(status, str(error) if status != 500 else f"model error: {last_line(error)}")
            elif row.generated or row.finish is not None:
                generation_metrics.first_token(context, request)
                new, request.new_tokens = row.generated[len(request.tokens):], []
                for i, token in enumerate(new):  # a line (an event) per token, as whole batches stream
                    request.new_tokens = [token]
                    request.tokens.append(token)
                    request.logprobs = row.logprobs[:len(request.tokens)]
                    if request.stream and not (row.finish is not None and i == len(new) - 1):
                        chunk = self._answer(idx, request, finished=False, context=context)
                        if chunk is not None:
                            _send(idx, chunk, context)
                            request.answered = True
                if row.finish is not None:
                    request.completion = self.batch.completion(request.id)
                    generation_metrics.finished(context, request)
            if request.status != 200 or request.completion is not None or len(request.tokens) == 1:
                rows = [r for r in self.batch.rows.values() if r.finish is None]
                generation_metrics.occupancy(context, len(rows), sum(len(r.prompt) + len(r.generated) for r in rows),
                                             self.capacity)
            if request.status != 200 or request.completion is not None:
                final = self._answer(idx, request, finished=True, context=context)
                loop.call_soon_threadsafe(done.set_result, final)

        self.loop.submit(request.id, request.prompt, request.params, on_step)
        return await done


def _send(idx: int, body: str, context) -> None:
    """A chunk of request idx's answer, now (a TorchServe intermediate response)."""
    answers = [None] * (idx + 1)
    answers[idx] = body
    send_intermediate_predict_response(answers, {idx: context.request_ids[idx]}, "Intermediate response", 200,
                                       context)
