"""One engine request seen as text: per-choice deltas with stop strings applied, and timing."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import ClassVar

from sse_starlette import EventSourceResponse
from sse_starlette.sse import SendTimeoutError
from starlette.background import BackgroundTask

from pagoda.engine.sampling_params import (
    VOCABULARY_FIELDS,
    SamplingParams,
    check_token_ids,
    tokenize_bad_words,
)
from pagoda.engine.sequence import Logprob, TokenLogprobs
from pagoda.server import defaults
from pagoda.server.detokenizer import IncrementalDetokenizer, token_bytes
from pagoda.server.engine_client import EngineClient
from pagoda.server.errors import APIError, invalid
from pagoda.server.keys.meter import Meter
from pagoda.server.metrics import Metrics
from pagoda.server.overload import DEFAULT_MAX_WAITING_REQUESTS, queue_full
from pagoda.server.reasoning import ReasoningParser
from pagoda.server.tokenizer_thread import TokenizerThread
from pagoda.server.worker_client import WorkerDeadError

logger = logging.getLogger(__name__)
_send_timeout_s = defaults.STREAM_SEND_TIMEOUT_S


def set_stream_send_timeout(seconds: float) -> None:
    global _send_timeout_s
    _send_timeout_s = seconds


# JSON leaves these raw, and SSE does not end a line at them, but str.splitlines does: a client
# reading the stream with httpx's aiter_lines (or any splitlines) would cut the event in two
_SPLITLINES_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse_json(body: dict) -> str:
    """A streamed event's JSON, UTF-8 as sent (ensure_ascii=False) but for the three line
    breaks above, escaped, which any JSON parser reads back the same."""
    text = json.dumps(body, ensure_ascii=False)
    return text if text.isascii() else text.translate(_SPLITLINES_BREAKS)


class _EventStream(EventSourceResponse):
    """An SSE response that cuts a client which stops reading: once the socket's buffers are
    full, a send that waits `send_timeout` seconds ends the stream (its request is aborted in
    the engine), so that a stalled client holds neither memory nor a batch slot."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:
            logger.warning("a stream client stopped reading for %g s: cut", self.send_timeout)
            if self.background is not None:  # skipped by the error
                await self.background()


def event_stream(
    chunks: AsyncIterator[str], meter: Meter, background: BackgroundTask | None = None
) -> EventSourceResponse:
    """SSE response for a stream of JSON chunks. Validation happened before: once the 200 is
    sent, a failure can only be told in the stream itself, as an OpenAI error event. The key's
    slot and budget hold are released before `[DONE]` goes out: a client may send its next
    request on reading it. `background` runs once the stream has ended, its client gone or
    not."""

    async def guarded() -> AsyncIterator[str]:
        # sse-starlette closes this generator when its client leaves mid-send; each generator
        # closes the one it reads from, so that the engine request is aborted and no longer
        # counted in flight at once, even while something still holds a reference to one
        try:
            async with aclosing(chunks):
                async for chunk in chunks:
                    if chunk == "[DONE]":
                        meter.release()
                    yield chunk
        except (WorkerDeadError, ValueError) as exc:
            status = 503 if isinstance(exc, WorkerDeadError) else 400
            logger.warning("stream ended by an error: %s", exc)
            yield json.dumps(APIError(status, str(exc)).body())
            meter.release()
            yield "[DONE]"

    return _EventStream(guarded(), ping=15, send_timeout=_send_timeout_s, background=background)


@dataclass
class ServedModel:
    """A chat model the server exposes: its engine process and its tokenizer."""

    id: str
    client: EngineClient
    kind: ClassVar[str] = "chat"
    tokenizer: object
    created: int = field(default_factory=lambda: int(time.time()))
    owned_by: str = "pagoda"
    max_model_len: int = 0
    supports_tools: bool = True
    supports_json: bool = True
    tool_call_parser: str = "hermes"  # a key of server.tool_parsers.PARSERS
    reasoning: ReasoningParser | None = None  # --reasoning-parser
    max_waiting_requests: int = DEFAULT_MAX_WAITING_REQUESTS
    tokenizing: TokenizerThread = field(default_factory=TokenizerThread)
    # a LoRA adapter served on the engine of `parent` (its model id) is a model of its own;
    # it shares its parent's engine, tokenizer and settings
    lora: str | None = None  # the adapter's name in the engine
    parent: str | None = None
    root: str | None = None  # where the adapter comes from (a folder or a hub id)
    adapters: list[ServedModel] = field(default_factory=list)  # a base model's

    def adapter(self, name: str, root: str) -> ServedModel:
        """The adapter `name` of this model's engine, served as the model `name`."""
        return replace(self, id=name, lora=name, parent=self.id, root=root, adapters=[])

    def check_queue(self) -> None:
        """429 at once when the engine has its limit of sequences waiting for a batch slot."""
        limit = self.max_waiting_requests
        if self.client.num_waiting >= limit:
            raise queue_full(self.id, f"{limit} requests waiting, its limit")

    def token_text(self, token_id: int) -> str:
        return _token_text(self.tokenizer, token_id)

    def token_bytes(self, token_id: int) -> bytes:
        return _token_bytes(self.tokenizer, token_id)

    def check_prompt(self, prompt_token_ids: list[int], param: str) -> None:
        if not prompt_token_ids:
            raise invalid("the prompt is empty", param=param)
        vocab = self.client.info["vocab_size"]
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise invalid(f"token ids must be in [0, {vocab})", param=param)

    def sampling_params(self, prompt_len: int, kwargs: dict, param: str) -> SamplingParams:
        """Engine parameters for a prompt of `prompt_len` tokens, its context checked.
        `param` names the prompt's field: "messages" or "prompt"."""
        for name in VOCABULARY_FIELDS:
            try:
                check_token_ids(name, kwargs.get(name), self.client.info["vocab_size"])
            except ValueError as exc:
                raise invalid(str(exc), param=name) from None
        room = self.max_model_len - prompt_len
        max_tokens = kwargs.get("max_tokens")
        if room < (max_tokens if max_tokens is not None else 1):
            wanted = "no tokens" if max_tokens is None else f"{max_tokens} tokens"
            raise APIError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {prompt_len + (max_tokens or 0)} tokens ({prompt_len} in the "
                f"{param}, {wanted} for the completion). Please reduce the length of the "
                f"{param} or completion.",
                param=param,
                code="context_length_exceeded",
            )
        defaults = self.client.info["sampling_defaults"]
        if max_tokens is None:
            max_tokens = min(room, defaults.get("max_tokens", room))
        if (cap := self.client.info.get("max_tokens_cap")) is not None:
            max_tokens = min(max_tokens, cap)  # the operator's, over the request's (as vLLM)
            if kwargs.get("min_tokens", 0) > room:
                raise invalid(
                    f"min_tokens ({kwargs['min_tokens']}) exceeds the {room} tokens that the "
                    f"context leaves after the {param}",
                    param="min_tokens",
                )
        bad_words = tokenize_bad_words(self.tokenizer, kwargs.get("bad_words"))
        try:
            return SamplingParams(
                **{
                    **defaults,
                    **kwargs,
                    "max_tokens": max_tokens,
                    "bad_words_token_ids": bad_words,
                }
            )
        except ValueError as exc:
            raise invalid(str(exc)) from exc


# What a logprob of -inf (a token a grammar rules out, among the top alternatives) is sent as:
# JSON has no infinity (the body would not serialize, a stream would carry `-Infinity`), and
# OpenAI and vLLM send -9999.0.
MIN_LOGPROB = -9999.0


def json_logprob(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


def top_and_chosen(token: int, entry: TokenLogprobs, k: int) -> list[tuple[int, Logprob]]:
    """A position's `k` likeliest tokens, likeliest first, then the chosen one (which may be
    among them)."""
    return sorted(entry.items(), key=lambda item: item[1].rank)[:k] + [(token, entry[token])]


def prompt_logprobs(generation: Generation, k: int) -> list[dict | None]:
    """vLLM's `prompt_logprobs`: per prompt token (None for the first), its own entry and the
    top k, keyed by token id: {"logprob", "rank", "decoded_token"}."""
    prompt, model = generation.prompt_token_ids, generation.model
    entries = generation.prompt_logprobs or [None] * len(prompt)
    return [
        None
        if entry is None
        else {
            str(t): {
                "logprob": json_logprob(lp.logprob),
                "rank": lp.rank,
                "decoded_token": model.token_text(t),
            }
            for t, lp in dict(top_and_chosen(token, entry, k)).items()
        }
        for token, entry in zip(prompt, entries)
    ]


@lru_cache(maxsize=1 << 16)
def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


@lru_cache(maxsize=1 << 16)
def _token_bytes(tokenizer, token_id: int) -> bytes:
    return token_bytes(tokenizer, token_id, _token_text(tokenizer, token_id))


@dataclass(slots=True)
class ChoiceDelta:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs]
    finish_reason: str | None


@dataclass
class Generation:
    """Streams the choices of one engine request. Usage figures are complete once the
    iteration ends."""

    model: ServedModel
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    stop: list[str]
    metrics: Metrics
    completion_tokens: int = 0
    cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprobs | None] | None = None

    async def __aiter__(self) -> AsyncIterator[ChoiceDelta]:
        n = self.params.n
        # a stop string would cut a grammar's output short of valid, while finish_reason
        # said "stop" (or "tool_calls"): under a grammar only the grammar's end stops
        stop = self.stop if self.params.structured_outputs is None else []
        detokenizers = [
            IncrementalDetokenizer(
                self.model.tokenizer,
                stop=stop,
                skip_special_tokens=self.params.skip_special_tokens,
                prompt_token_ids=self.prompt_token_ids,
                min_tokens=self.params.min_tokens,
            )
            for _ in range(n)
        ]
        done = [False] * n
        clock = _Clock(self.metrics, self.model.id, n)
        stream = self.model.client.generate(
            self.request_id, self.prompt_token_ids, self.params, self.model.lora
        )
        ran = True
        try:
            async with aclosing(stream) as deltas:
                async for delta in deltas:
                    if delta.index == 0:  # the others find the prompt that choice 0 computed
                        self.cached_tokens = delta.num_cached_tokens
                    if delta.prompt_logprobs is not None:
                        self.prompt_logprobs = delta.prompt_logprobs
                    if done[delta.index]:  # cut by a stop string: nothing more is sent
                        continue
                    clock.tick(delta.index)
                    detokenizer = detokenizers[delta.index]
                    text = detokenizer.add(delta.new_token_ids)
                    if detokenizer.stopped and self.params.include_stop_str_in_output:
                        text += detokenizer.stop_str
                    finish = "stop" if detokenizer.stopped else delta.finish_reason
                    if finish is not None and not detokenizer.stopped:
                        text += detokenizer.flush()
                    self.completion_tokens += len(delta.new_token_ids)
                    done[delta.index] = finish is not None
                    yield ChoiceDelta(
                        delta.index, text, delta.new_token_ids, delta.new_logprobs, finish
                    )
                    if finish is not None:
                        self._count_finished(finish)
                    if all(done):
                        break
                    if detokenizer.stopped and delta.finish_reason is None:
                        # the engine would go on with it until the other choices end
                        await self.model.client.finish(self.request_id, delta.index)
        except ValueError:  # the engine refused the request (a 400): nothing ran
            ran = False
            raise
        finally:
            # a choice cut short (its client left, its engine died, the drain ended it)
            # counts as "abort", and the request's tokens and latency count all the same
            if ran:
                self._count_finished("abort", done.count(False))
                clock.finish()
                self._count_tokens(prefix_known=clock.last[0] is not None)

    def _count_tokens(self, prefix_known: bool) -> None:
        """The request's usage in /metrics; its prefix cache lookup once choice 0 told it."""
        metrics, model, prompt = self.metrics, self.model.id, len(self.prompt_token_ids)
        metrics.prompt_tokens.labels(model).inc(prompt)
        metrics.generation_tokens.labels(model).inc(self.completion_tokens)
        metrics.request_prompt_tokens.labels(model).observe(prompt)
        metrics.request_generation_tokens.labels(model).observe(self.completion_tokens)
        looked_up = self.model.client.config.enable_prefix_caching and (
            self.params.prompt_logprobs is None  # such a prompt is computed whole
        )
        if prefix_known and looked_up:
            metrics.prefix_cache_queries.labels(model).inc(prompt)
            metrics.prefix_cache_hits.labels(model).inc(self.cached_tokens)

    def _count_finished(self, reason: str, choices: int = 1) -> None:
        if choices:
            self.metrics.requests.labels(self.model.id, reason).inc(choices)
            self.metrics.request_success.labels(self.model.id, reason).inc(choices)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


class _Clock:
    """TTFT, inter-token latency and end-to-end latency of one request. The time between
    tokens is each choice's own: the n choices of a step arrive together."""

    def __init__(self, metrics: Metrics, model_id: str, n: int) -> None:
        self.metrics = metrics
        self.model_id = model_id
        self.itl = metrics.itl.labels(model_id)  # once: `labels` costs more than `observe`
        self.start = time.monotonic()
        self.last: list[float | None] = [None] * n  # each choice's latest token

    def tick(self, index: int) -> None:
        now = time.monotonic()
        last = self.last[index]
        if last is not None:
            self.itl.observe(now - last)
        elif all(t is None for t in self.last):
            self.metrics.ttft.labels(self.model_id).observe(now - self.start)
        self.last[index] = now

    def finish(self) -> None:
        self.metrics.e2e.labels(self.model_id).observe(time.monotonic() - self.start)
