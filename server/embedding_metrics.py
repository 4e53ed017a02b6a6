"""Prometheus metrics of the embedding models: requests, input tokens, latency (counted by the
server) and batch sizes (counted by each worker, read from its stats at scrape time)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from pagoda.engine.stats import prometheus_buckets

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48)


class EmbeddingMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["model_name"]
        self.requests = Counter(
            "pagoda:embedding_requests",
            "Embedding requests by outcome (ok, rejected, aborted, failed)",
            [*labels, "status"],
            registry=registry,
        )
        self.inputs = Counter(
            "pagoda:embedding_inputs", "Inputs embedded", labels, registry=registry
        )
        self.input_tokens = Counter(
            "pagoda:embedding_input_tokens", "Input tokens embedded", labels, registry=registry
        )
        self.latency = Histogram(
            "pagoda:embedding_request_latency_seconds",
            "Embedding request latency from arrival to response",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )


class EmbeddingStatsCollector(Collector):
    """Reads each embedding worker's latest stats at scrape time."""

    def __init__(self, stats_by_model: Callable[[], dict[str, dict]]) -> None:
        self._stats_by_model = stats_by_model

    def collect(self) -> Iterable[GaugeMetricFamily | HistogramMetricFamily]:
        labels = ["model_name"]
        running = GaugeMetricFamily(
            "pagoda:embedding_requests_running", "Requests in the embedding worker", labels=labels
        )
        waiting = GaugeMetricFamily(
            "pagoda:embedding_inputs_waiting", "Inputs waiting for a batch", labels=labels
        )
        batch_size = HistogramMetricFamily(
            "pagoda:embedding_batch_size", "Inputs per forward pass", labels=labels
        )
        for model, stats in self._stats_by_model().items():
            running.add_metric([model], stats.get("running", 0))
            waiting.add_metric([model], stats.get("waiting", 0))
            if "batch_size" in stats:
                batch_size.add_metric([model], *prometheus_buckets(stats["batch_size"]))
        yield from (running, waiting, batch_size)
