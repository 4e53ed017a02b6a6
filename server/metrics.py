"""Prometheus metrics, named like vLLM's so that existing dashboards carry over (the list with
their meaning: docs/metrics.md)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pagoda.engine.stats import prometheus_buckets
from pagoda.server.embedding_metrics import EmbeddingMetrics
from pagoda.server.image_metrics import ImageMetrics

# The `_created` series (a timestamp per series) doubles the exposition and no PromQL needs it.
disable_created_metrics()

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
FINISH_REASONS = ("stop", "length", "abort")  # what the server counts (a tool call is a stop)
# tokens per request, 1-2-5 steps as vLLM's (its are cut at max_model_len; these fit every model)
LENGTH_BUCKETS = tuple(m * 10**e for e in range(7) for m in (1, 2, 5))


class EngineStatsCollector(Collector):
    """Reads each engine's latest stats at scrape time (no polling of its own); image workers'
    too, for the running and waiting gauges (images in the batch and queued)."""

    def __init__(
        self,
        stats_by_model: Callable[[], dict[str, dict]],
        image_stats_by_model: Callable[[], dict[str, dict]] = dict,
    ) -> None:
        self._stats_by_model = stats_by_model
        self._image_stats_by_model = image_stats_by_model

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        gauges = {
            "running": GaugeMetricFamily(
                "pagoda:num_requests_running",
                "Sequences in the running batch",
                labels=["model_name"],
            ),
            "waiting": GaugeMetricFamily(
                "pagoda:num_requests_waiting",
                "Sequences waiting to be scheduled",
                labels=["model_name"],
            ),
            "kv_cache_usage": GaugeMetricFamily(
                "pagoda:kv_cache_usage_perc",
                "Fraction of KV cache blocks in use",
                labels=["model_name"],
            ),
            "prefix_cache_blocks": GaugeMetricFamily(
                "pagoda:prefix_cache_blocks",
                "KV cache blocks holding a cached prefix (free ones are evicted on demand)",
                labels=["model_name"],
            ),
        }
        preemptions = CounterMetricFamily(
            "pagoda:num_preemptions",
            "Sequences preempted (KV blocks freed, to be recomputed) since start",
            labels=["model_name"],
        )
        queue_time = HistogramMetricFamily(
            "pagoda:request_queue_time_seconds",
            "Time from a request's arrival in the engine to its first scheduled step",
            labels=["model_name"],
        )
        for model, stats in self._stats_by_model().items():
            for key, gauge in gauges.items():
                gauge.add_metric([model], float(stats.get(key, 0)))
            preemptions.add_metric([model], float(stats.get("num_preemptions", 0)))
            if "queue_time" in stats:
                queue_time.add_metric([model], *prometheus_buckets(stats["queue_time"]))
        for model, stats in self._image_stats_by_model().items():
            for key in ("running", "waiting"):
                gauges[key].add_metric([model], float(stats.get(key, 0)))
        yield from (*gauges.values(), preemptions, queue_time)


class Metrics:
    def __init__(
        self,
        stats_by_model: Callable[[], dict[str, dict]],
        image_stats_by_model: Callable[[], dict[str, dict]] = dict,
    ) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(EngineStatsCollector(stats_by_model, image_stats_by_model))
        labels = ["model_name"]
        self.prompt_tokens = Counter(
            "pagoda:prompt_tokens", "Prompt tokens processed", labels, registry=self.registry
        )
        self.generation_tokens = Counter(
            "pagoda:generation_tokens", "Tokens generated", labels, registry=self.registry
        )
        self.request_prompt_tokens = Histogram(
            "pagoda:request_prompt_tokens",
            "Prompt tokens per request",
            labels,
            buckets=LENGTH_BUCKETS,
            registry=self.registry,
        )
        self.request_generation_tokens = Histogram(
            "pagoda:request_generation_tokens",
            "Tokens generated per request (all its choices)",
            labels,
            buckets=LENGTH_BUCKETS,
            registry=self.registry,
        )
        self.prefix_cache_queries = Counter(
            "pagoda:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache",
            labels,
            registry=self.registry,
        )
        self.prefix_cache_hits = Counter(
            "pagoda:prefix_cache_hits",
            "Prompt tokens found in the prefix cache",
            labels,
            registry=self.registry,
        )
        self.requests = Counter(
            "pagoda:requests",
            "Finished requests by finish reason",
            [*labels, "finish_reason"],
            registry=self.registry,
        )
        # vLLM's name and label for the same count, so that its dashboards' panels work
        self.request_success = Counter(
            "pagoda:request_success",
            "Finished requests by finish reason (vLLM's series)",
            [*labels, "finished_reason"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "pagoda:time_to_first_token_seconds",
            "Time to first token",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "pagoda:inter_token_latency_seconds",
            "Time between consecutive tokens of a stream",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.http_responses = Counter(
            "pagoda:http_responses",
            "HTTP responses by route template and status code",
            ["route", "status"],
            registry=self.registry,
        )
        self.e2e = Histogram(
            "pagoda:e2e_request_latency_seconds",
            "Request latency from arrival to last token",
            labels,
            buckets=E2E_BUCKETS,
            registry=self.registry,
        )
        self.images = ImageMetrics(self.registry)

        self.embeddings = EmbeddingMetrics(self.registry)

    def start_series(self, chat_models: Iterable[str]) -> None:
        """Each chat model's request series at 0 from the start, as vLLM's: a series that
        appears at its first count loses that count to `rate()` and `increase()`, and a
        panel shows "no data" instead of 0."""
        for model in chat_models:
            for metric in (
                self.prompt_tokens,
                self.generation_tokens,
                self.request_prompt_tokens,
                self.request_generation_tokens,
                self.prefix_cache_queries,
                self.prefix_cache_hits,
                self.ttft,
                self.itl,
                self.e2e,
            ):
                metric.labels(model)
            for reason in FINISH_REASONS:
                self.requests.labels(model, reason)
                self.request_success.labels(model, reason)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class HTTPResponseCounter:
    """ASGI middleware around the whole app (auth and exception handlers included) that counts
    every response by route template and status. The template, not the raw path, keeps the
    number of series bounded; a path no route matches counts as "unmatched"."""

    def __init__(self, app: ASGIApp, counter: Counter, routes: list[BaseRoute]) -> None:
        self.app = app
        self.counter = counter
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = self._template(scope)
        started = False

        async def counting_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.counter.labels(route, str(message["status"])).inc()
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            if not started:  # Starlette's outermost middleware answers it with a 500
                self.counter.labels(route, "500").inc()
            raise

    def _template(self, scope: Scope) -> str:
        for route in self.routes:
            match, _ = route.matches(scope)
            if match is not Match.NONE:  # PARTIAL: the path matches, the method does not
                return getattr(route, "path", "unmatched")
        return "unmatched"
