"""The engine core in its own process: a busy loop around LLMEngine, fed over ZeroMQ.

The frontend PUSHes requests to `input_addr`; the core PUSHes to `output_addr`. Messages
are msgpack-encoded lists whose first element names them:

    frontend -> core   ["add", request_id, prompt_token_ids, sampling_params_dict]
                       ["abort", [request_id, ...]]
                       ["shutdown"]
    core -> frontend   ["ready", info]          once the model is loaded
                       ["failed", message]      the model could not be loaded
                       ["outputs", [delta, ...], stats]   after every step
                       ["rejected", request_id, message]  an add that failed validation
                       ["stats", stats]         while idle, every STATS_INTERVAL_S
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import time

import msgpack
import torch
import zmq

from pagoda.engine.config import EngineConfig
from pagoda.engine.cpu_threads import ThreadGovernor
from pagoda.engine.llm_engine import LLMEngine
from pagoda.engine.sampling_params import SamplingParams
from pagoda.engine.sequence import Logprob, SequenceDelta, TokenLogprobs

STATS_INTERVAL_S = 1.0
logger = logging.getLogger(__name__)


def pack(message: list) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpack(data: bytes) -> list:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


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


def engine_stats(engine: LLMEngine) -> dict:
    scheduler = engine.scheduler
    return {
        "running": len(scheduler.running),
        "waiting": len(scheduler.waiting),
        "kv_cache_usage": engine.block_manager.usage,
        "num_preemptions": scheduler.num_preemptions,
    }


def run_engine_core(config: EngineConfig, input_addr: str, output_addr: str) -> None:
    """Process entry point. Ctrl-C goes to the frontend, which drains and says shutdown."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s engine: %(message)s")
    context = zmq.Context()
    inbox = context.socket(zmq.PULL)
    inbox.connect(input_addr)
    outbox = context.socket(zmq.PUSH)
    outbox.connect(output_addr)
    try:
        engine = LLMEngine(config)
    except Exception as exc:  # reported to the frontend, which fails its start-up with it
        outbox.send(pack(["failed", f"{type(exc).__name__}: {exc}"]))
        return
    outbox.send(pack(["ready", _ready_info(engine)]))
    _busy_loop(engine, inbox, outbox)
    context.destroy(linger=1000)


def _ready_info(engine: LLMEngine) -> dict:
    return {
        "max_model_len": engine.max_model_len,
        "vocab_size": engine.vocab_size,
        "eos_token_ids": sorted(engine.eos_token_ids),
        "num_kv_blocks": engine.block_manager.num_blocks,
        "block_size": engine.config.block_size,
        "max_num_batched_tokens": engine.scheduler.max_num_batched_tokens,
        "device": str(engine.device),
        "dtype": str(engine.dtype).removeprefix("torch."),
    }


def _busy_loop(engine: LLMEngine, inbox: zmq.Socket, outbox: zmq.Socket) -> None:
    last_stats = 0.0
    governor = None
    threads = torch.get_num_threads()
    if engine.device.type == "cpu" and engine.config.cpu_threads is None and threads > 1:
        governor = ThreadGovernor(threads)
    while True:
        if governor is not None:
            governor.tick()
        busy = engine.has_unfinished_requests()
        timeout_ms = 0 if busy else int(STATS_INTERVAL_S * 1000)
        while inbox.poll(timeout_ms):
            if not _handle(engine, unpack(inbox.recv()), outbox):
                return
            timeout_ms = 0
        if engine.has_unfinished_requests():
            deltas = engine.step()
            outbox.send(pack(["outputs", [encode_delta(d) for d in deltas], engine_stats(engine)]))
            for request_id, message in engine.take_rejected():
                outbox.send(pack(["rejected", request_id, message]))
        elif time.monotonic() - last_stats >= STATS_INTERVAL_S:
            outbox.send(pack(["stats", engine_stats(engine)]))
            last_stats = time.monotonic()


def _handle(engine: LLMEngine, message: list, outbox: zmq.Socket) -> bool:
    kind = message[0]
    if kind == "add":
        _, request_id, prompt_token_ids, params = message
        try:
            engine.add_request(request_id, prompt_token_ids, SamplingParams(**params))
        except ValueError as exc:
            outbox.send(pack(["rejected", request_id, str(exc)]))
    elif kind == "abort":
        for request_id in message[1]:
            engine.abort_request(request_id)
    elif kind == "shutdown":
        return False
    return True
