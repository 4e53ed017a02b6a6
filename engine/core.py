"""The engine core in its own process: LLMEngine driven by the shared worker loop
(engine/worker.py). An add's payload is `prompt_token_ids, sampling_params_dict, lora` (a LoRA
adapter's name or None, which it is when absent); an output is an encoded SequenceDelta.

Its `stats` are a dict: "running", "waiting" (sequences now), "kv_cache_usage" (fraction of the
blocks in use), "prefix_cache_blocks" (blocks holding a cached prefix, in use or free),
"num_preemptions" (cumulative) and "queue_time", the cumulative histogram of
the seconds from a request's arrival here to its first step, as [bounds, counts per bucket
(the last one above every bound), sum] (`engine.stats.Histogram.encode`).
"""

from __future__ import annotations

import dataclasses
from functools import partial

from pagoda.engine.config import EngineConfig
from pagoda.engine.cpu_threads import ThreadGovernor, governor_for
from pagoda.engine.sampling_params import SamplingParams
from pagoda.engine.sequence import Logprob, SequenceDelta, TokenLogprobs
from pagoda.engine.worker import run_worker
from pagoda.logs import LogSettings


def encode_params(params: SamplingParams) -> dict:
    return dataclasses.asdict(params)  # nested dataclasses (structured_outputs) as dicts


def _encode_logprobs(entry: TokenLogprobs | None) -> list | None:
    if entry is None:
        return None
    return [[token, lp.logprob, lp.rank] for token, lp in entry.items()]


def _decode_logprobs(entry: list | None) -> TokenLogprobs | None:
    if entry is None:
        return None
    return {token: Logprob(logprob, rank) for token, logprob, rank in entry}


def encode_delta(d: SequenceDelta) -> list:
    prompt = None if d.prompt_logprobs is None else [_encode_logprobs(e) for e in d.prompt_logprobs]
    return [
        d.request_id,
        d.index,
        d.new_token_ids,
        [_encode_logprobs(e) for e in d.new_logprobs],
        d.finish_reason,
        d.num_prompt_tokens,
        d.num_cached_tokens,
        prompt,
    ]


def decode_delta(fields: list) -> SequenceDelta:
    rid, index, token_ids, logprobs, finish, num_prompt, num_cached, prompt = fields
    return SequenceDelta(
        request_id=rid,
        index=index,
        new_token_ids=token_ids,
        new_logprobs=[_decode_logprobs(e) for e in logprobs],
        finish_reason=finish,
        num_prompt_tokens=num_prompt,
        num_cached_tokens=num_cached,
        prompt_logprobs=None if prompt is None else [_decode_logprobs(e) for e in prompt],
    )


class EngineCore:
    """LLMEngine as a worker of the shared loop."""

    def __init__(self, config: EngineConfig) -> None:
        # Imported here, in the engine's process: the server imports this module for the wire
        # format and the process target, and has no use for the model code's imports.
        from pagoda.engine.llm_engine import LLMEngine

        self.engine = LLMEngine(config)
        self.governor: ThreadGovernor | None = governor_for(self.engine.device, config.cpu_threads)
        if config.tensor_parallel_size > 1:
            self.governor = None  # the ranks share the cores in fixed parts

    def info(self) -> dict:
        engine = self.engine
        return {
            "max_model_len": engine.max_model_len,
            "vocab_size": engine.vocab_size,
            "eos_token_ids": sorted(engine.eos_token_ids),
            "sampling_defaults": engine.sampling_defaults,
            "max_tokens_cap": engine.max_tokens_cap,
            "num_kv_blocks": engine.block_manager.num_blocks,
            "block_size": engine.config.block_size,
            "max_num_batched_tokens": engine.scheduler.max_num_batched_tokens,
            "device": str(engine.device),
            "dtype": str(engine.dtype).removeprefix("torch."),
            "tensor_parallel_size": engine.config.tensor_parallel_size,
            "lora_modules": {name: loaded.source for name, loaded in engine.loras.items()},
            "max_loras": engine.max_loras,
        }

    def add(
        self, request_id: str, prompt_token_ids: list[int], params: dict, lora: str | None = None
    ) -> None:
        self.engine.add_request(request_id, prompt_token_ids, SamplingParams(**params), lora)

    def control(self, method: str, *args: str) -> None:
        """An operator's change between steps: load_lora(name, source), unload_lora(name)."""
        if method == "load_lora":
            self.engine.load_lora(*args)
        elif method == "unload_lora":
            self.engine.unload_lora(*args)
        else:
            raise ValueError(f"the engine core has no control {method!r}")

    def abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.engine.abort_request(request_id)

    def finish(self, request_id: str, index: int) -> list[list]:
        """End one choice of a request whose other choices go on (the server found a stop
        string in its text). Its last output says so, unless it had ended already and said so
        then: each choice ends in exactly one output with a finish reason."""
        delta = self.engine.finish_sequence(request_id, index, "stop")
        return [] if delta is None else [encode_delta(delta)]

    def has_work(self) -> bool:
        return self.engine.has_unfinished_requests()

    def step(self) -> list[list]:
        return [encode_delta(d) for d in self.engine.step()]

    def take_rejected(self) -> list[tuple[str, str]]:
        return self.engine.take_rejected()

    def close(self) -> None:
        """Stop the tensor-parallel ranks, those of other nodes too (they take the stop and
        exit 0); with one rank, nothing to do."""
        self.engine.close()

    def stats(self) -> dict:
        scheduler = self.engine.scheduler
        return {
            "running": len(scheduler.running),
            "waiting": len(scheduler.waiting),
            "kv_cache_usage": self.engine.block_manager.usage,
            "prefix_cache_blocks": len(self.engine.block_manager.cached),
            "num_preemptions": scheduler.num_preemptions,
            "queue_time": scheduler.queue_time.encode(),
        }


def run_engine_core(
    config: EngineConfig, input_addr: str, output_addr: str, log_settings: LogSettings
) -> None:
    """Process entry point (module level, picklable arguments: a worker process's target)."""
    run_worker(partial(EngineCore, config), input_addr, output_addr, log_settings)
