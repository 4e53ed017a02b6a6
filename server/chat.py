"""POST /v1/chat/completions: JSON and SSE."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from starlette.responses import JSONResponse

from pagoda.engine.sequence import TokenLogprobs
from pagoda.server.errors import invalid
from pagoda.server.generation import ChoiceDelta, Generation, ServedModel, event_stream
from pagoda.server.keys.meter import Meter
from pagoda.server.metrics import Metrics
from pagoda.server.protocol import ChatCompletionRequest, TokenizeRequest, messages_for_template


def chat_prompt(
    model: ServedModel, req: ChatCompletionRequest | TokenizeRequest, add_generation_prompt=True
) -> list[int]:
    try:
        text = model.tokenizer.apply_chat_template(
            messages_for_template(req), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as exc:  # a template that rejects the conversation (roles, order)
        raise invalid(f"the chat template rejected the messages: {exc}", param="messages") from exc
    return model.tokenizer.encode(text, add_special_tokens=False)


async def chat_completion(
    model: ServedModel, req: ChatCompletionRequest, metrics: Metrics, meter: Meter
):
    prompt = chat_prompt(model, req)
    params = model.sampling_params(len(prompt), req.sampling_kwargs(), param="messages")
    meter.admit(model.id, len(prompt) + params.max_tokens * params.n)
    generation = Generation(
        model, f"chatcmpl-{uuid.uuid4().hex}", prompt, params, req.stop_strings(), metrics
    )
    meter.track(generation)
    if req.stream:
        include_usage = req.stream_options is not None and req.stream_options.include_usage
        return event_stream(_stream(generation, req, include_usage))
    return JSONResponse(await _complete(generation, req))


async def _complete(generation: Generation, req: ChatCompletionRequest) -> dict:
    n = generation.params.n
    texts = [""] * n
    finish: list[str | None] = [None] * n
    logprobs: list[list[dict]] = [[] for _ in range(n)]
    async for delta in generation:
        texts[delta.index] += delta.text
        finish[delta.index] = delta.finish_reason or finish[delta.index]
        if req.logprobs:
            logprobs[delta.index] += _logprob_content(generation.model, delta, req.top_logprobs)
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": texts[i], "refusal": None},
            "logprobs": {"content": logprobs[i], "refusal": None} if req.logprobs else None,
            "finish_reason": finish[i],
        }
        for i in range(n)
    ]
    return {
        "id": generation.request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": req.model,
        "choices": choices,
        "usage": usage(generation),
        "system_fingerprint": None,
    }


async def _stream(
    generation: Generation, req: ChatCompletionRequest, include_usage: bool
) -> AsyncIterator[str]:
    created = int(time.time())
    started: set[int] = set()

    def chunk(choices: list[dict], **extra) -> str:
        body = {
            "id": generation.request_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": req.model,
            "system_fingerprint": None,
            "choices": choices,
            **({"usage": None} if include_usage else {}),
            **extra,
        }
        return json.dumps(body, ensure_ascii=False)

    async for delta in generation:
        message: dict = {"content": delta.text}
        if delta.index not in started:
            started.add(delta.index)
            message = {"role": "assistant", **message}
        choice = {
            "index": delta.index,
            "delta": message,
            "logprobs": {
                "content": _logprob_content(generation.model, delta, req.top_logprobs),
                "refusal": None,
            }
            if req.logprobs
            else None,
            "finish_reason": delta.finish_reason,
        }
        yield chunk([choice])
    if include_usage:
        yield chunk([], usage=usage(generation))
    yield "[DONE]"


def usage(generation: Generation) -> dict:
    return {
        "prompt_tokens": generation.prompt_tokens,
        "completion_tokens": generation.completion_tokens,
        "total_tokens": generation.prompt_tokens + generation.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": generation.cached_tokens},
    }


def _logprob_content(model: ServedModel, delta: ChoiceDelta, top: int | None) -> list[dict]:
    return [
        _token_entry(model, token, entry, top or 0)
        for token, entry in zip(delta.token_ids, delta.logprobs)
    ]


def _token_entry(model: ServedModel, token: int, entry: TokenLogprobs, top: int) -> dict:
    # `entry` holds the top alternatives and the chosen token, which may rank below them
    ranked = sorted(entry.items(), key=lambda item: item[1].rank)[:top]
    return {
        **_logprob(model, token, entry[token].logprob),
        "top_logprobs": [_logprob(model, t, lp.logprob) for t, lp in ranked],
    }


def _logprob(model: ServedModel, token: int, logprob: float) -> dict:
    text = model.token_text(token)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
