"""POST /v1/chat/completions: JSON and SSE."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

from starlette.responses import JSONResponse

from pagoda.engine.sampling_params import StructuredOutputsParams
from pagoda.engine.sequence import TokenLogprobs
from pagoda.server.errors import invalid
from pagoda.server.generation import (
    ChoiceDelta,
    Generation,
    ServedModel,
    event_stream,
    json_logprob,
    prompt_logprobs,
    sse_json,
)
from pagoda.server.keys.meter import Meter
from pagoda.server.metrics import Metrics
from pagoda.server.protocol import ChatCompletionRequest, TokenizeRequest, messages_for_template
from pagoda.server.reasoning import ReasoningStream
from pagoda.server.structured import extra_constraint, extra_fields, response_format_constraint
from pagoda.server.tools import (
    ToolCallStream,
    ToolPlan,
    plan_tools,
    template_supports_tools,
    template_tools,
    tool_call_dicts,
    unsupported,
    with_fallback_prompt,
)


def chat_prompt(
    model: ServedModel,
    req: ChatCompletionRequest | TokenizeRequest,
    tools: ToolPlan | None = None,
    param: str = "messages",
) -> list[int]:
    """The conversation's prompt tokens; `param` names the field it came from, for a 400."""
    if model.tokenizer.chat_template is None:  # a base model's (transformers' error is vague)
        raise invalid(
            f"The model '{model.id}' has no chat template (its tokenizer has none) to render the "
            f"{param} with: send a prompt to /v1/completions, or serve the model with a chat "
            "template (the catalog's chat_template, pagoda serve --chat-template).",
            param=param,
        )
    messages, kwargs = messages_for_template(req), dict(req.chat_template_kwargs or {})
    offered = tools if tools is not None and tools.mode != "none" else None
    if template_supports_tools(model.tokenizer):
        if offered is not None:
            kwargs["tools"] = template_tools(offered)
    else:
        messages = with_fallback_prompt(messages, offered)
    try:
        text = model.tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
            **kwargs,
        )
    except Exception as exc:  # a template that rejects the conversation (roles, order)
        raise invalid(f"the chat template rejected the {param}: {exc}", param=param) from exc
    return model.tokenizer.encode(text, add_special_tokens=False)


async def chat_completion(
    model: ServedModel, req: ChatCompletionRequest, metrics: Metrics, meter: Meter
):
    tools = plan_tools(req, model.tool_call_parser, model.supports_tools)
    output_format = ("response_format", response_format_constraint(req.response_format))
    generation = await start_generation(
        model, req, tools, output_format, metrics, meter, f"chatcmpl-{uuid.uuid4().hex}"
    )
    if tools is not None and tools.mode == "none":
        tools = None
    if req.stream:
        return event_stream(_stream(generation, req, tools), meter)
    return JSONResponse(await _complete(generation, req, tools))


async def start_generation(
    model: ServedModel,
    req: ChatCompletionRequest,
    tools: ToolPlan | None,
    output_format: tuple[str, StructuredOutputsParams | None],
    metrics: Metrics,
    meter: Meter,
    request_id: str,
    prompt_param: str = "messages",
) -> Generation:
    """The engine request for a conversation (admitted against the key's limits and tracked
    for its usage): /v1/chat/completions' and /v1/responses'. `output_format` is the grammar
    the request's own format field asks for, under that field's name; `prompt_param` names
    the field the conversation came from (for the 400 of a prompt too long)."""
    model.check_queue()
    kwargs = {**req.sampling_kwargs(), **_constraint_kwargs(model, req, tools, output_format)}
    if model.reasoning is not None and model.reasoning.tags_are_special:
        kwargs["skip_special_tokens"] = False  # the tags must reach the reasoning parser
    prompt = await model.tokenizing.run(chat_prompt, model, req, tools, prompt_param)
    if model.reasoning is not None and "structured_outputs" in kwargs:
        kwargs["structured_outputs"] = model.reasoning.after_thinking(
            kwargs["structured_outputs"], prompt
        )
    params = model.sampling_params(len(prompt), kwargs, param=prompt_param)
    meter.admit(model.id, len(prompt), params.max_tokens * params.n)
    generation = Generation(model, request_id, prompt, params, req.stop_strings(), metrics)
    meter.track(generation)
    return generation


def _reasoning_streams(generation: Generation) -> list[ReasoningStream] | None:
    parser = generation.model.reasoning
    if parser is None:
        return None
    return [parser.stream(generation.prompt_token_ids) for _ in range(generation.params.n)]


def _reasoning_fields(reasoning: str) -> dict:
    # vLLM's name, and the one DeepSeek's API and earlier vLLM releases use
    return {"reasoning": reasoning, "reasoning_content": reasoning}


def _constraint_kwargs(
    model: ServedModel,
    req: ChatCompletionRequest,
    tools: ToolPlan | None,
    output_format: tuple[str, StructuredOutputsParams | None],
) -> dict:
    """The grammar that a forced tool call, the output format or vLLM's fields ask for (one
    at most: a 400 naming them for more)."""
    given = {
        "tool_choice": tools.constraint if tools is not None else None,
        output_format[0]: output_format[1],
        ", ".join(extra_fields(req)): extra_constraint(req),
    }
    given = {name: constraint for name, constraint in given.items() if constraint is not None}
    if len(given) > 1:
        names = ", ".join(given)
        raise invalid(f"give one structured output constraint, got {names}", param=names)
    name, constraint = next(iter(given.items()), (None, None))
    if name not in (None, "tool_choice") and not model.supports_json:
        raise unsupported(model.id, "structured outputs", param=name)
    kwargs = {} if constraint is None else {"structured_outputs": constraint}
    if tools is not None and tools.parser is not None and tools.parser.needs_special_tokens:
        kwargs["skip_special_tokens"] = False  # the parser's marker is a special token
    return kwargs


def _message(text: str, finish: str | None, tools: ToolPlan | None) -> tuple[dict, str | None]:
    content, calls = (text, []) if tools is None else tools.calls(text)
    message = {"role": "assistant", "content": content, "refusal": None}
    if calls:
        message["tool_calls"] = tool_call_dicts(calls)
        finish = "tool_calls" if finish == "stop" else finish
    return message, finish


async def _complete(
    generation: Generation, req: ChatCompletionRequest, tools: ToolPlan | None
) -> dict:
    n = generation.params.n
    texts, thoughts = [""] * n, [""] * n
    finish: list[str | None] = [None] * n
    logprobs: list[list[dict]] = [[] for _ in range(n)]
    splits = _reasoning_streams(generation)
    async for delta in generation:
        i = delta.index
        if splits is None:
            texts[i] += delta.text
        else:
            reasoning, text = split_delta(splits[i], delta)
            thoughts[i], texts[i] = thoughts[i] + reasoning, texts[i] + text
        finish[i] = delta.finish_reason or finish[i]
        if req.logprobs:
            logprobs[i] += logprob_content(generation.model, delta, req.top_logprobs)
    choices = []
    for i in range(n):
        message, finish_reason = _message(texts[i], finish[i], tools)
        if splits is not None and splits[i].thought:
            message["content"] = message["content"] or None  # all of it was thinking
            if req.include_reasoning:
                message.update(_reasoning_fields(thoughts[i]))
        choices.append(
            {
                "index": i,
                "message": message,
                "logprobs": {"content": logprobs[i], "refusal": None} if req.logprobs else None,
                "finish_reason": finish_reason,
            }
        )
    body = {
        "id": generation.request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": req.model,
        "choices": choices,
        "usage": usage(generation, splits),
        "system_fingerprint": None,
    }
    if req.prompt_logprobs is not None:  # never streamed (refused)
        body["prompt_logprobs"] = prompt_logprobs(generation, req.prompt_logprobs)
    return body


async def _stream(
    generation: Generation,
    req: ChatCompletionRequest,
    tools: ToolPlan | None,
) -> AsyncIterator[str]:
    created = int(time.time())
    at_end, every_chunk = req.stream_usage()
    started: set[int] = set()
    calls = [ToolCallStream(tools) for _ in range(generation.params.n)] if tools else None
    splits = _reasoning_streams(generation)

    def chunk(choices: list[dict], **extra) -> str:
        body = {
            "id": generation.request_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": req.model,
            "system_fingerprint": None,
            "choices": choices,
            **({"usage": usage(generation, splits) if every_chunk else None} if at_end else {}),
            **extra,
        }
        return sse_json(body)

    async with aclosing(aiter(generation)) as deltas:
        async for delta in deltas:
            text, thought = delta.text, {}
            if splits is not None:
                reasoning, text = split_delta(splits[delta.index], delta)
                if reasoning and req.include_reasoning:
                    thought = _reasoning_fields(reasoning)
            if calls is None:
                message = {**thought, "content": text} if text or not thought else thought
                pieces = [(message, delta.finish_reason)]
            else:
                pieces = _tool_pieces(calls[delta.index], text, delta.finish_reason)
                pieces = [(thought, None), *pieces] if thought else pieces
                if not pieces and (delta.index not in started or req.logprobs):
                    pieces = [({}, None)]  # the role, or the logprobs of held-back tokens
            logprobs = None
            if req.logprobs:  # not built for every delta of the streams that ask none
                content = logprob_content(generation.model, delta, req.top_logprobs)
                logprobs = {"content": content, "refusal": None}
            for i, (message, finish) in enumerate(pieces):
                if delta.index not in started:
                    started.add(delta.index)
                    message = {"role": "assistant", "content": None, **message}
                choice = {
                    "index": delta.index,
                    "delta": message,
                    "logprobs": logprobs if i == 0 else None,
                    "finish_reason": finish,
                }
                yield chunk([choice])
    if at_end:
        yield chunk([], usage=usage(generation, splits))
    yield "[DONE]"


def split_delta(stream: ReasoningStream, delta: ChoiceDelta) -> tuple[str, str]:
    reasoning, content = stream.feed(delta.text, len(delta.token_ids))
    if delta.finish_reason is None:
        return reasoning, content
    rest = stream.finish()
    return reasoning + rest[0], content + rest[1]


def _tool_pieces(
    stream: ToolCallStream, text: str, finish: str | None
) -> list[tuple[dict, str | None]]:
    """(delta, finish_reason) of each chunk for new text: the content or calls, if any, then at
    the end the finish_reason alone with an empty delta, as OpenAI sends it (the SDK's stream
    helper reads a chunk's finish_reason before its calls, and so misses a call sent with it)."""
    content, call_deltas = stream.feed(text)
    if finish is not None:
        rest, more = stream.finish()
        content, call_deltas = content + rest, call_deltas + more
        if stream.num_calls and finish == "stop":
            finish = "tool_calls"
    message: dict = {"content": content} if content else {}
    if call_deltas:
        message["tool_calls"] = call_deltas
    pieces = [(message, None)] if message else []
    return pieces if finish is None else [*pieces, ({}, finish)]


def usage(generation: Generation, splits: list[ReasoningStream] | None = None) -> dict:
    body = {
        "prompt_tokens": generation.prompt_tokens,
        "completion_tokens": generation.completion_tokens,
        "total_tokens": generation.prompt_tokens + generation.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": generation.cached_tokens},
    }
    if splits is not None:  # a reasoning model's, as vLLM and OpenAI count them
        reasoning = sum(split.reasoning_tokens for split in splits)
        body["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return body


def logprob_content(model: ServedModel, delta: ChoiceDelta, top: int | None) -> list[dict]:
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
    return {
        "token": text,
        "logprob": json_logprob(logprob),
        "bytes": list(model.token_bytes(token)),
    }
