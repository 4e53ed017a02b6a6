"""The server process's own resources on /metrics, for leak checks over a long run (the soak
test reads them): open fds and resident memory (prometheus-client's process collector),
threads and asyncio tasks."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


class RuntimeCollector(Collector):
    """Threads and asyncio tasks of this process, counted at scrape time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def collect(self) -> Iterable[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "pagoda:server_threads", "Threads of the server process", threading.active_count()
        )
        yield GaugeMetricFamily(
            "pagoda:server_asyncio_tasks",
            "asyncio tasks alive in the server process",
            len(asyncio.all_tasks(self._loop)),
        )


def register_process_metrics(registry: CollectorRegistry) -> None:
    """Call from the event loop's thread (it is the loop whose tasks are counted)."""
    ProcessCollector(registry=registry)
    registry.register(RuntimeCollector(asyncio.get_running_loop()))
