"""The server's handle on one engine core process: a worker client that streams deltas."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from contextlib import aclosing

from pagoda.engine.config import EngineConfig
from pagoda.engine.core import decode_delta, encode_params, run_engine_core
from pagoda.engine.sampling_params import SamplingParams
from pagoda.engine.sequence import SequenceDelta
from pagoda.server.worker_client import WorkerClient, WorkerDeadError


class EngineClient(WorkerClient):
    kind = "engine"
    load_gauges = ("running", "waiting", "kv_cache_usage", "prefix_cache_blocks")

    def __init__(self, config: EngineConfig, name: str) -> None:
        super().__init__(name, run_engine_core, (config,))
        self.config = config
        self.stats = {"running": 0, "waiting": 0, "kv_cache_usage": 0.0, "num_preemptions": 0}
        self.num_sequences_in_flight = 0  # the unfinished choices of the requests in flight

    @property
    def num_waiting(self) -> int:
        """Sequences waiting for a batch slot: the engine's own count (sent with its stats, so
        a step late), or the sequences in flight beyond what one batch runs (exact at once,
        for a burst that arrives between two stats)."""
        beyond_batch = self.num_sequences_in_flight - self.config.max_num_seqs
        return max(self.stats.get("waiting", 0), beyond_batch)

    async def load_lora(self, name: str, source: str) -> None:
        await self.control("load_lora", name, source)
        self._restart_with_adapters({**(self.config.lora_modules or {}), name: source})

    async def unload_lora(self, name: str) -> None:
        await self.control("unload_lora", name)
        adapters = dict(self.config.lora_modules or {})
        adapters.pop(name, None)
        self._restart_with_adapters(adapters)

    def _restart_with_adapters(self, adapters: dict[str, str]) -> None:
        # an engine restarted after a crash serves the adapters of now, not those of its start
        self.config = dataclasses.replace(self.config, lora_modules=adapters or None)
        self._args = (self.config,)

    def decode_output(self, fields: list) -> SequenceDelta:
        return decode_delta(fields)

    @property
    def max_model_len(self) -> int:
        return self.info["max_model_len"]

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        lora: str | None = None,
    ) -> AsyncIterator[SequenceDelta]:
        """Stream the request's deltas until all its choices finish; `lora` names the adapter
        (of the engine's lora_modules) it runs with."""
        unfinished = params.n
        self.num_sequences_in_flight += unfinished

        def finished(delta: SequenceDelta) -> bool:
            nonlocal unfinished
            if delta.finish_reason is not None:
                unfinished -= 1
                self.num_sequences_in_flight -= 1
            return unfinished == 0

        payload = [prompt_token_ids, encode_params(params), lora]
        try:
            # closed with this generator, not when collected: its close aborts the request
            async with aclosing(self.stream(request_id, payload, finished)) as deltas:
                async for delta in deltas:
                    yield delta
        finally:
            self.num_sequences_in_flight -= unfinished

    async def finish(self, request_id: str, index: int) -> None:
        """End one choice of a request whose other choices go on; its stream gets the choice's
        last output (finish reason "stop") unless the choice had ended already."""
        with contextlib.suppress(WorkerDeadError):  # a dead process has nothing running
            await self._send(["finish", request_id, index])
