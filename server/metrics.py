"""Prometheus metrics, named like vLLM's so that existing dashboards carry over."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from pagoda.server.embedding_metrics import EmbeddingMetrics

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)


class EngineStatsCollector(Collector):
    """Reads each engine's latest stats at scrape time (no polling of its own)."""

    def __init__(self, stats_by_model: Callable[[], dict[str, dict]]) -> None:
        self._stats_by_model = stats_by_model

    def collect(self) -> Iterable[GaugeMetricFamily]:
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
            "num_preemptions": GaugeMetricFamily(
                "pagoda:num_preemptions", "Preemptions since start", labels=["model_name"]
            ),
        }
        for model, stats in self._stats_by_model().items():
            for key, gauge in gauges.items():
                gauge.add_metric([model], float(stats.get(key, 0)))
        yield from gauges.values()


class Metrics:
    def __init__(self, stats_by_model: Callable[[], dict[str, dict]]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(EngineStatsCollector(stats_by_model))
        labels = ["model_name"]
        self.prompt_tokens = Counter(
            "pagoda:prompt_tokens", "Prompt tokens processed", labels, registry=self.registry
        )
        self.generation_tokens = Counter(
            "pagoda:generation_tokens", "Tokens generated", labels, registry=self.registry
        )
        self.requests = Counter(
            "pagoda:requests",
            "Finished requests by finish reason",
            [*labels, "finish_reason"],
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
        self.e2e = Histogram(
            "pagoda:e2e_request_latency_seconds",
            "Request latency from arrival to last token",
            labels,
            buckets=E2E_BUCKETS,
            registry=self.registry,
        )

        self.embeddings = EmbeddingMetrics(self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
