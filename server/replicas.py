"""Data parallelism: N engine cores of one model behind one served model.

A request goes to the replica with the fewest sequences in flight (each request's unfinished
choices: one n=8 request is 8 sequences' work), unless a replica already served a prompt with
the same first KV block (a system prompt, a conversation's earlier turns) and is not much
busier: there its prefix is likely still cached. `/metrics` gains per-replica
series (label `replica`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import replace

import torch
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from pagoda.engine.config import EngineConfig
from pagoda.engine.sampling_params import SamplingParams
from pagoda.engine.sequence import SequenceDelta
from pagoda.server.engine_client import EngineClient
from pagoda.server.worker_client import start_side_by_side

PREFIX_SLACK = 4  # sequences in flight a prefix's replica may have beyond the least busy one
MAX_PREFIXES = 65536  # first blocks remembered (least recently used go first)


def replica_config(config: EngineConfig, index: int) -> EngineConfig:
    """Replica `index` on its own GPUs, index*tp after the engine's device (`auto` included);
    on the CPU they share cores. Under tensor parallelism with a --master-port, each replica's
    ranks meet on a port of their own, master_port + index: on one port, the second replica's
    ranks failed to start (the port in use) or joined the first replica's group."""
    if config.master_port and index:
        config = replace(config, master_port=config.master_port + index)
    if config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available()):
        return config
    first = 0 if config.device == "auto" else torch.device(config.device).index or 0
    return replace(config, device=f"cuda:{first + index * config.tensor_parallel_size}")


class EngineReplicas:
    """What the server asks of an EngineClient, over several of them."""

    kind = "engine"

    def __init__(self, config: EngineConfig, name: str, count: int) -> None:
        self.name = name
        self.config = config
        self.replicas = [EngineClient(replica_config(config, i), name) for i in range(count)]
        self.routed = [0] * count  # requests sent to each replica
        self._owners: OrderedDict[int, int] = OrderedDict()  # first-block hash -> replica

    async def start(self) -> None:
        await start_side_by_side([r.start() for r in self.replicas])

    async def shutdown(self, timeout: float = 10.0) -> None:
        await asyncio.gather(*(r.shutdown(timeout) for r in self.replicas))

    async def load_lora(self, name: str, source: str) -> None:
        """Into every replica, or none: one that refuses unloads it from those that took it."""
        loaded = []
        try:
            for replica in self.replicas:
                await replica.load_lora(name, source)
                loaded.append(replica)
        except BaseException:
            for replica in loaded:
                with contextlib.suppress(Exception):
                    await replica.unload_lora(name)
            raise

    async def unload_lora(self, name: str) -> None:
        for replica in self.replicas:
            await replica.unload_lora(name)

    @property
    def info(self) -> dict:
        return self.replicas[0].info

    @property
    def max_model_len(self) -> int:
        return self.replicas[0].max_model_len

    @property
    def healthy(self) -> bool:
        return any(r.healthy for r in self.replicas)

    @property
    def dead(self) -> bool:
        return not self.healthy

    @property
    def reason(self) -> str | None:
        """Why the model is down: the first replica's reason, while none serves."""
        return None if self.healthy else self.replicas[0].reason

    @property
    def restarts(self) -> int:
        return sum(r.restarts for r in self.replicas)

    def health(self) -> dict:
        """The model's line in /health: ready while a replica serves, with each replica's."""
        lines = [r.health() for r in self.replicas]
        status = "ready" if self.healthy else lines[0]["status"]
        return {
            "status": status,
            "reason": self.reason,
            "restarts": self.restarts,
            "pid": None,
            "replicas": lines,
        }

    def fail_in_flight(self, error: Exception) -> None:
        for replica in self.replicas:
            replica.fail_in_flight(error)

    @property
    def num_in_flight(self) -> int:
        return sum(r.num_in_flight for r in self.replicas)

    @property
    def num_waiting(self) -> int:
        return sum(r.num_waiting for r in self.replicas)

    @property
    def stats(self) -> dict:
        return merge_stats([r.stats for r in self.replicas])

    def route(self, prompt_token_ids: list[int], lora: str | None = None) -> int:
        live = [i for i, r in enumerate(self.replicas) if r.healthy] or [0]
        load = [r.num_sequences_in_flight for r in self.replicas]
        chosen = min(live, key=lambda i: load[i])
        block = self.config.block_size
        if len(prompt_token_ids) >= block:
            # an adapter's KV blocks are its own: the same prompt under another is not cached
            key = hash((lora, *prompt_token_ids[:block]))
            owner = self._owners.get(key)
            if owner in live and load[owner] <= load[chosen] + PREFIX_SLACK:
                chosen = owner
            self._owners[key] = chosen
            self._owners.move_to_end(key)
            if len(self._owners) > MAX_PREFIXES:
                self._owners.popitem(last=False)
        self.routed[chosen] += 1
        return chosen

    def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        lora: str | None = None,
    ) -> AsyncIterator[SequenceDelta]:
        replica = self.replicas[self.route(prompt_token_ids, lora)]
        return replica.generate(request_id, prompt_token_ids, params, lora)

    async def finish(self, request_id: str, index: int) -> None:
        """EngineClient.finish, sent to every replica: the others have no such request."""
        await asyncio.gather(*(r.finish(request_id, index) for r in self.replicas if r.healthy))


def merge_stats(stats: list[dict]) -> dict:
    """One model's stats from its replicas': counts summed, KV cache usage averaged."""
    summed = ("running", "waiting", "num_preemptions", "prefix_cache_blocks")
    merged: dict = {key: sum(s.get(key, 0) for s in stats) for key in summed}
    merged["kv_cache_usage"] = sum(s.get("kv_cache_usage", 0.0) for s in stats) / len(stats)
    histograms = [s["queue_time"] for s in stats if "queue_time" in s]
    if histograms:
        bounds = histograms[0][0]
        counts = [sum(c) for c in zip(*(h[1] for h in histograms))]
        merged["queue_time"] = [bounds, counts, sum(h[2] for h in histograms)]
    return merged


class ReplicaStatsCollector(Collector):
    """Per-replica series for the models served by several engine cores."""

    def __init__(self, replicas_by_model: Callable[[], dict[str, EngineReplicas]]) -> None:
        self._replicas_by_model = replicas_by_model

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        labels = ["model_name", "replica"]
        gauges = {
            "running": GaugeMetricFamily(
                "pagoda:replica_num_requests_running",
                "Sequences running, per replica",
                labels=labels,
            ),
            "waiting": GaugeMetricFamily(
                "pagoda:replica_num_requests_waiting",
                "Sequences waiting, per replica",
                labels=labels,
            ),
            "kv_cache_usage": GaugeMetricFamily(
                "pagoda:replica_kv_cache_usage_perc",
                "Fraction of KV cache blocks in use, per replica",
                labels=labels,
            ),
        }
        routed = CounterMetricFamily(
            "pagoda:replica_requests_routed", "Requests sent to each replica", labels=labels
        )
        for model, replicas in self._replicas_by_model().items():
            for i, replica in enumerate(replicas.replicas):
                for key, gauge in gauges.items():
                    gauge.add_metric([model, str(i)], float(replica.stats.get(key, 0)))
                routed.add_metric([model, str(i)], float(replicas.routed[i]))
        yield from (*gauges.values(), routed)
