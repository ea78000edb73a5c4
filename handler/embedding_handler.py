"""TorchServe handler: sentence embeddings from a tensor-parallel model traced by `python -m tracer`.

Bodies: text/plain (one text -> one embedding), JSON {"inputs": "text"} (same) or
{"inputs": ["t1", ...]} (a list of embeddings, in order); other Content-Types get 415
(handler/request_parsing.py). OpenAI's POST v1/embeddings and GET v1/models under
/predictions/NAME/1.0/ (handler/openai_api.py). A dynamic batch runs in the model calls that cost
least by the worker's own timings (tracer/engine/embedder.py; packed: usually one call with the
batch's texts end to end); with TPSERVE_TIMINGS set, each
request's phases are written out (handler/timings.py).
TorchServe's template: preprocess (each request parsed and tokenized on its own), inference,
postprocess. A request can fail only itself: whatever goes wrong with one request (bad input: 4xx;
its sub-batch failing in the model: 500) is that request's answer, and every other request of the
batch gets its own. Settings come from model-config.yaml's `handler:` section.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from ts.torch_handler.base_handler import BaseHandler

from handler import open_inference, openai_api
from handler.open_inference import V2
from handler.openai_api import EMBEDDINGS, MODELS, NATIVE
from handler.request_parsing import ParsedRequest, RequestError, float32_json, parse_texts, request_body
from handler.timings import Timings
from handler.worker_threads import threads_per_rank
from tracer.engine.embedder import Embedder
from tracer.errors import ArtifactError, TextTooLongError, TokenIdError

logger = logging.getLogger(__name__)


class EmbeddingHandler(BaseHandler):
    def initialize(self, context) -> None:
        started = time.time()
        # TorchServe decodes JSON / text bodies itself unless told not to, logging a traceback for
        # every malformed one; request_parsing.py does it per request with a 4xx instead.
        os.environ["TS_DECODE_INPUT_REQUEST"] = "false"
        config = getattr(context, "model_yaml_config", None) or {}
        settings = config.get("handler", {})
        # TorchServe's torchrun mode (parallelType tp): this worker is one rank; torchrun made the group
        executor = "torchrun" if config.get("parallelType") == "tp" and "torchrun" in config else "threads"
        model_dir = Path(context.system_properties["model_dir"])
        threads = threads_per_rank(config)
        try:
            self.embedder = Embedder(model_dir, tp_degree=settings.get("tp_degree"),
                                     too_long=settings.get("too_long", "truncate"), executor=executor,
                                     threads_per_rank=threads)
        except ArtifactError as exc:  # tampered, incomplete or foreign artifacts: never serve them
            logger.error("tpserve: refusing to load %s: %s: %s", model_dir.name, type(exc).__name__, exc)
            raise
        self.max_inputs = int(settings.get("max_inputs_per_request", 64))
        self.embedder.warm_up()
        self.timings = Timings()
        self.created = openai_api.created_now()
        logger.info("tpserve: loaded tp=%d buckets=%s batch=%d executor=%s threads/rank=%d in %.1fs",
                    self.embedder.model.tp_degree, self.embedder.buckets, self.embedder.batch_size, executor,
                    threads, time.time() - started)
        self.initialized = True

    def handle(self, data, context):
        return self.timings.around(super().handle, data, context)

    def preprocess(self, data) -> list[ParsedRequest]:
        requests = []
        for idx, row in enumerate(data):
            with self.timings.phase("preprocess", idx):
                requests.append(self._parse(idx, row))
        return requests

    def _parse(self, idx: int, row) -> ParsedRequest:
        request = ParsedRequest(route=openai_api.route(self.context, idx))
        try:
            openai_api.check_route(request.route, (EMBEDDINGS,))
            value, content_type = request_body(self.context, idx, row)
            if request.route == EMBEDDINGS:
                body = openai_api.read_json(value, content_type)
                inputs, request.encoding = openai_api.parse_embeddings(body, self.max_inputs,
                                                                       self.embedder.dimension)
                request.as_list = True
                tokenize = self.embedder.token_ids if isinstance(inputs[0], str) else self.embedder.checked_ids
                with self.timings.phase("tokenize", idx):
                    request.ids, request.truncated = tokenize(inputs)
            elif request.route == NATIVE:
                grpc = open_inference.from_grpc(self.context, idx)
                request.v2 = open_inference.parse_v2(value, content_type, grpc, self.max_inputs)
                if request.v2 is not None:  # KServe v2: REST /v2/models/NAME/infer or gRPC ModelInfer
                    request.route, texts, request.as_list = V2, request.v2.texts, True
                else:
                    texts, request.as_list = parse_texts(value, content_type, self.max_inputs)
                with self.timings.phase("tokenize", idx):
                    request.ids, request.truncated = self.embedder.token_ids(texts)
        except RequestError as exc:
            if isinstance(exc, open_inference.V2RequestError):
                request.route, request.v2 = V2, exc.request
            request.fail(exc.status, str(exc))
        except TokenIdError as exc:
            request.fail(400, str(exc))
        except TextTooLongError as exc:
            request.fail(413, str(exc))
        except Exception as exc:  # noqa: BLE001 - one odd request must not fail its batch
            logger.warning("tpserve: request %d unreadable: %s: %s", idx, type(exc).__name__, exc)
            request.fail(400, f"could not read the request ({type(exc).__name__})")
        return request

    def _is_explain(self) -> bool:  # no explanations: a client's "explain" header changes nothing
        return False

    def inference(self, requests: list[ParsedRequest], *args, **kwargs) -> list[ParsedRequest]:
        good = [r for r in requests if r.ids and r.status == 200]
        flat = [ids for r in good for ids in r.ids]
        with self.timings.phase("inference"):
            embeddings = iter(self.embedder.embed_ids(flat, self._report) if flat else [])
        for request in good:
            request.vectors = [next(embeddings) for _ in request.ids]
            failed = next((v for v in request.vectors if isinstance(v, Exception)), None)
            if failed is not None:  # its sub-batch failed in the model (e.g. in one rank)
                request.fail(500, f"model error: {failed}")
        return requests

    def _report(self, bucket: int, rows: int, real_tokens: int, computed_tokens: int, seconds: float) -> None:
        """Per bucket: texts run (counter); per sub-batch the model time and the padded share of the
        tokens it computed, as histograms (a gauge would keep only the last value). TorchServe gives histograms
        Prometheus' default buckets (5 ms .. 10 s; 0.005 .. 1), hence seconds and a ratio."""
        from ts.metrics.dimension import Dimension
        from ts.metrics.metric_type_enum import MetricTypes

        self.timings.shared[f"model_{bucket}"] += seconds
        self.timings.shared[f"rows_{bucket}"] += rows
        metrics, dims = self.context.metrics, [Dimension("bucket", str(bucket))]
        metrics.add_counter("TextsPerBucket", rows, dimensions=dims)
        metrics.add_metric("ModelSeconds", seconds, "s", dimensions=dims, metric_type=MetricTypes.HISTOGRAM)
        metrics.add_metric("PaddingRatio", 1 - real_tokens / computed_tokens, "ratio", dimensions=dims,
                           metric_type=MetricTypes.HISTOGRAM)

    def postprocess(self, requests: list[ParsedRequest]) -> list[str]:
        answers = []
        for idx, request in enumerate(requests):
            if request.status == 200:
                try:
                    with self.timings.phase("serialize", idx):
                        answer = self._answer(request)
                except Exception as exc:  # noqa: BLE001
                    request.fail(500, f"could not write the answer ({type(exc).__name__})")
                else:
                    answers.append(answer)
                    if request.truncated:
                        self.context.set_response_header(idx, "X-Tpserve-Truncated", "true")
            if request.status != 200:
                answers.append(self._error(idx, request))
            self.context.set_response_content_type(idx, "application/json")
        return answers

    def _error(self, idx: int, request: ParsedRequest) -> str:
        if request.route == V2:
            v2 = request.v2
            return open_inference.error_answer(self.context, idx, request.status, request.error, v2.grpc,
                                               v2.request_id)
        return openai_api.route_error(self.context, idx, request.route, request.status, request.error)

    def _answer(self, request: ParsedRequest) -> str:
        if request.route == MODELS:
            return openai_api.models_answer(self.context.model_name, self.created)
        if request.route == V2:
            return open_inference.answer(request.v2, self.context, request.vectors)
        if request.route == EMBEDDINGS:
            tokens = sum(map(len, request.ids))
            return openai_api.embeddings_answer(self.context.model_name, request.vectors, request.encoding, tokens)
        vectors = list(map(float32_json, request.vectors))
        return "[" + ",".join(vectors) + "]" if request.as_list else vectors[0]
