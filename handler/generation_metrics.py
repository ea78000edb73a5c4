"""A generation worker's LLM metrics, in TorchServe's metrics (Prometheus at the metrics address with
metrics_mode=prometheus), named after what vLLM and TGI export:

    TimeToFirstTokenSeconds     histogram  request reached the worker -> its first token
    TimePerOutputTokenSeconds   histogram  per request: (last token - first token) / (tokens - 1)
    PromptTokens                counter    prompt tokens of the requests run
    CachedPromptTokens          counter    of those, read from the prefix cache (not prefilled)
    GeneratedTokens             counter
    RunningRows                 gauge      requests generating (continuous batching: after each step)
    KVCacheUsage                gauge      cache positions held by running requests / all positions

Waiting requests are TorchServe's (its frontend queues them until a worker takes them): its
`ts_queue_latency_microseconds` and `QueueTime` report them. docs/operations.md has PromQL for each.
"""

from __future__ import annotations

import time

from handler.generation_requests import GenerationRequest


def _types():
    from ts.metrics.metric_type_enum import MetricTypes

    return MetricTypes


def first_token(context, request: GenerationRequest) -> None:
    """The request's first token is out (call once, when it is)."""
    if request.first_token_at or not request.arrived:
        return
    request.first_token_at = time.monotonic()
    context.metrics.add_metric("TimeToFirstTokenSeconds", request.first_token_at - request.arrived, "s",
                               metric_type=_types().HISTOGRAM)


def finished(context, request: GenerationRequest) -> None:
    """The request is done: its tokens' counters and its time per output token."""
    c, metrics = request.completion, context.metrics
    if c is None:
        return
    metrics.add_counter("PromptTokens", c.prompt_tokens)
    metrics.add_counter("CachedPromptTokens", c.cached_tokens)
    metrics.add_counter("GeneratedTokens", len(c.token_ids))
    if request.first_token_at and len(c.token_ids) > 1:
        per_token = (time.monotonic() - request.first_token_at) / (len(c.token_ids) - 1)
        metrics.add_metric("TimePerOutputTokenSeconds", per_token, "s", metric_type=_types().HISTOGRAM)


def occupancy(context, running: int, positions: int, capacity: int) -> None:
    """Rows generating now and the share of the KV cache's positions they hold."""
    context.metrics.add_metric("RunningRows", running, "count", metric_type=_types().GAUGE)
    context.metrics.add_metric("KVCacheUsage", positions / capacity, "ratio", metric_type=_types().GAUGE)
