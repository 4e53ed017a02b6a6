"""The server's handle on one engine core process: a worker client that streams deltas."""

from __future__ import annotations

from collections.abc import AsyncIterator

from pagoda.engine.config import EngineConfig
from pagoda.engine.core import decode_delta, encode_params, run_engine_core
from pagoda.engine.sampling_params import SamplingParams
from pagoda.engine.sequence import SequenceDelta
from pagoda.server.worker_client import WorkerClient


class EngineClient(WorkerClient):
    kind = "engine"

    def __init__(self, config: EngineConfig, name: str) -> None:
        super().__init__(name, run_engine_core, (config,))
        self.config = config
        self.stats = {"running": 0, "waiting": 0, "kv_cache_usage": 0.0, "num_preemptions": 0}

    def decode_output(self, fields: list) -> SequenceDelta:
        return decode_delta(fields)

    @property
    def max_model_len(self) -> int:
        return self.info["max_model_len"]

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[SequenceDelta]:
        """Stream the request's deltas until all its choices finish."""
        unfinished = params.n

        def finished(delta: SequenceDelta) -> bool:
            nonlocal unfinished
            unfinished -= delta.finish_reason is not None
            return unfinished == 0

        payload = [prompt_token_ids, encode_params(params)]
        return self.stream(request_id, payload, finished)
