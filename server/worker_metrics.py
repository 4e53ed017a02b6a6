"""Each model's worker process on /metrics: whether it serves and how often it restarted,
for alerts on a crash loop or a model given up (server/worker_client.py supervises)."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from pagoda.server.worker_client import WorkerClient


class WorkerCollector(Collector):
    def __init__(self, clients: dict[str, WorkerClient]) -> None:
        self._clients = clients

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        ready = GaugeMetricFamily(
            "pagoda:model_ready",
            "1 while the model's worker process serves, 0 while it restarts or was given up",
            labels=["model_name"],
        )
        restarts = CounterMetricFamily(
            "pagoda:worker_restarts",
            "Times the model's worker process died and was started again",
            labels=["model_name"],
        )
        for name, client in self._clients.items():
            ready.add_metric([name], float(client.healthy))
            restarts.add_metric([name], float(client.restarts))
        yield from (ready, restarts)
