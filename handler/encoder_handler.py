"""TorchServe handler for encoder models traced by `python -m tracer`: sentence embeddings, and
classifiers / rerankers (cross-encoders).

One handler per task, protocols as adapters (handler/encoder_requests.py): each request of a batch is
parsed by its protocol's adapter into a task (embed, rerank, classify) and its inputs, tokenized on its
own, then the batch's inputs run through the model together in the calls that cost least by the
worker's own timings (tracer/engine/embedder.py; packed: usually one call with the batch's texts or
pairs end to end), and each adapter writes its request's answer:

    POST /predictions/NAME                      native (native_encoder_api.py), or KServe v2 by its body
    POST /v2/models/NAME/infer, gRPC ModelInfer KServe v2 (open_inference.py)
    POST /predictions/NAME/1.0/v1/embeddings    OpenAI (openai_api.py; embedding models)
    POST /predictions/NAME/1.0/v1/rerank        Cohere / Jina (rerank_api.py; classification models)
    GET  /predictions/NAME/1.0/v1/models        OpenAI's model list

TorchServe's template: preprocess (parse, tokenize), inference, postprocess. A request can fail only
itself: whatever goes wrong with one request (bad input: 4xx; its sub-batch failing in the model: 500)
is that request's answer, and every other request of the batch gets its own. With TPSERVE_TIMINGS set,
each request's phases are written out (handler/timings.py). Settings come from model-config.yaml's
`handler:` section.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from ts.torch_handler.base_handler import BaseHandler

from handler import open_inference, openai_api, rerank_api
from handler.encoder_requests import EncoderRequest, ModelInfo
from handler.native_encoder_api import NativeEncoderApi
from handler.open_inference import OpenInferenceApi
from handler.request_parsing import RequestError, request_body
from handler.timings import Timings
from handler.worker_threads import threads_per_rank
from tracer.engine.embedder import Embedder
from tracer.errors import ArtifactError, PromptNameError, TextTooLongError, TokenIdError

logger = logging.getLogger(__name__)

NATIVE, V2 = NativeEncoderApi(), OpenInferenceApi()
UNKNOWN = openai_api.OpenAIModels()  # writes an unknown route's 404 in OpenAI's shape
# the routes of each kind of model, by the URL path after /predictions/NAME/VERSION/
ROUTES = {
    "embedding": {openai_api.EMBEDDINGS: openai_api.OpenAIEmbeddings(), openai_api.MODELS: openai_api.OpenAIModels()},
    "classification": {**dict.fromkeys(rerank_api.ROUTES, rerank_api.RerankApi()),
                       openai_api.MODELS: openai_api.OpenAIModels()},
}


class EncoderHandler(BaseHandler):
    def initialize(self, context) -> None:
        started = time.time()
        # TorchServe decodes JSON / text bodies itself unless told not to, logging a traceback for
        # every malformed one; the adapters do it per request with a 4xx instead.
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
        e = self.embedder
        self.model = ModelInfo(name=context.model_name, kind=e.task, dimension=e.dimension, labels=e.labels,
                               max_inputs=int(settings.get("max_inputs_per_request", 64)),
                               max_documents=int(settings.get("max_documents_per_request", 1000)),
                               created=openai_api.created_now())
        self.routes = ROUTES[e.task]
        e.warm_up()
        self.timings = Timings()
        logger.info("tpserve: loaded %s tp=%d buckets=%s batch=%d executor=%s threads/rank=%d in %.1fs", e.task,
                    e.model.tp_degree, e.buckets, e.batch_size, executor, threads, time.time() - started)
        self.initialized = True

    def handle(self, data, context):
        return self.timings.around(super().handle, data, context)

    def preprocess(self, data) -> list[EncoderRequest]:
        requests = []
        for idx, row in enumerate(data):
            with self.timings.phase("preprocess", idx):
                requests.append(self._parse(idx, row))
        return requests

    def _parse(self, idx: int, row) -> EncoderRequest:
        path = openai_api.route(self.context, idx)
        request = EncoderRequest(adapter=self.routes.get(path, NATIVE if path == openai_api.NATIVE else UNKNOWN))
        try:
            value, content_type = request_body(self.context, idx, row)
            if path not in self.routes and path != openai_api.NATIVE:
                raise RequestError(404, f"unknown endpoint {path!r}; this model serves "
                                        f"{', '.join(sorted(self.routes))}")
            if path == openai_api.NATIVE:  # native, or KServe v2 by its body
                body = open_inference.detect(value, content_type, open_inference.from_grpc(self.context, idx))
                if body is not None:
                    request.adapter, value = V2, body
            request = request.adapter.parse(value, content_type, self.model, self.context, idx)
            if request.status == 200 and request.task != "models":
                with self.timings.phase("tokenize", idx):
                    request.encoded, request.truncated = self._tokenize(request)
        except RequestError as exc:
            request.fail(exc.status, str(exc))
        except (TokenIdError, PromptNameError) as exc:
            request.fail(400, str(exc))
        except TextTooLongError as exc:
            request.fail(413, str(exc))
        except Exception as exc:  # noqa: BLE001 - one odd request must not fail its batch
            logger.warning("tpserve: request %d unreadable: %s: %s", idx, type(exc).__name__, exc)
            request.fail(400, f"could not read the request ({type(exc).__name__})")
        return request

    def _tokenize(self, request: EncoderRequest):
        """(Encoded inputs, truncated): texts and pairs tokenized, OpenAI's token-id arrays checked."""
        if isinstance(request.inputs[0], list):
            return self.embedder.checked_ids(request.inputs)
        return self.embedder.token_ids(request.inputs, request.prompt_name)

    def _is_explain(self) -> bool:  # no explanations: a client's "explain" header changes nothing
        return False

    def inference(self, requests: list[EncoderRequest], *args, **kwargs) -> list[EncoderRequest]:
        good = [r for r in requests if r.encoded and r.status == 200]
        flat = [x for r in good for x in r.encoded]
        with self.timings.phase("inference"):
            vectors = iter(self.embedder.embed_ids(flat, self._report) if flat else [])
        for request in good:
            request.vectors = [next(vectors) for _ in request.encoded]
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

    def postprocess(self, requests: list[EncoderRequest]) -> list[str]:
        answers = []
        for idx, request in enumerate(requests):
            if request.status == 200:
                try:
                    with self.timings.phase("serialize", idx):
                        answer = request.adapter.answer(request, self.model, self.context, idx)
                except Exception as exc:  # noqa: BLE001
                    request.fail(500, f"could not write the answer ({type(exc).__name__})")
                else:
                    answers.append(answer)
                    if request.truncated:
                        self.context.set_response_header(idx, "X-Tpserve-Truncated", "true")
            if request.status != 200:
                answers.append(request.adapter.error(request, self.model, self.context, idx))
            self.context.set_response_content_type(idx, "application/json")
        return answers
