"""Cumulative statistics the engine keeps and sends with every stats message, so that a lost or
skipped message loses nothing (the frontend exposes the latest values at each scrape)."""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field

# seconds; a request waits for a free slot or KV blocks, from milliseconds to minutes
QUEUE_TIME_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass(slots=True)
class Histogram:
    bounds: tuple[float, ...]
    counts: list[int] = field(init=False)  # per bucket, not cumulative; the last: +Inf
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # a bound is inclusive (le)
        self.total += value

    def encode(self) -> list:
        return [list(self.bounds), list(self.counts), self.total]


def prometheus_buckets(encoded: list) -> tuple[list[tuple[str, int]], float]:
    """An encoded histogram as Prometheus takes it: (le, cumulative count) pairs, and the sum.
    Bounds are written as prometheus_client writes its own ("16.0")."""
    bounds, counts, total = encoded
    labels = [*(str(float(bound)) for bound in bounds), "+Inf"]
    return list(zip(labels, itertools.accumulate(counts))), total
