"""POST /v1/completions (the legacy endpoint): batches of prompts, echo, legacy logprobs."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

from starlette.responses import JSONResponse

from pagoda.engine.sequence import TokenLogprobs
from pagoda.server.chat import usage
from pagoda.server.errors import APIError
from pagoda.server.generation import (
    ChoiceDelta,
    Generation,
    ServedModel,
    event_stream,
    json_logprob,
    prompt_logprobs,
    sse_json,
    top_and_chosen,
)
from pagoda.server.keys.meter import Meter
from pagoda.server.metrics import Metrics
from pagoda.server.protocol import CompletionRequest
from pagoda.server.structured import extra_constraint


async def completion(model: ServedModel, req: CompletionRequest, metrics: Metrics, meter: Meter):
    model.check_queue()
    request_id = f"cmpl-{uuid.uuid4().hex}"
    kwargs = req.sampling_kwargs()
    if (constraint := extra_constraint(req)) is not None:
        kwargs["structured_outputs"] = constraint
    given = req.prompts()
    prompts = await model.tokenizing.run(lambda: [_token_ids(model, p) for p in given])
    # the echo gives a text prompt back as it came: decoding its ids would add the text of
    # the special tokens the tokenizer put in (Llama's "<|begin_of_text|>"), and a client
    # cuts the completion off the echo by the prompt's length
    texts = [p if isinstance(p, str) else None for p in given]
    generations = []
    for i, prompt in enumerate(prompts):
        try:
            model.check_prompt(prompt, param="prompt")
            params = model.sampling_params(len(prompt), kwargs, param="prompt")
        except APIError as exc:
            if len(prompts) > 1 and exc.param == "prompt":  # which of a batch (lm-eval's)
                exc.message = f"prompt {i} of {len(prompts)}: {exc.message}"
            raise
        generations.append(
            Generation(model, f"{request_id}-{i}", prompt, params, req.stop_strings(), metrics)
        )
    prompt_tokens = sum(g.prompt_tokens for g in generations)
    meter.admit(model.id, prompt_tokens, sum(g.params.max_tokens * g.params.n for g in generations))
    for generation in generations:
        meter.track(generation)
    if req.stream:
        stream = _stream(request_id, generations, texts, req)
        return event_stream(stream, meter)
    return JSONResponse(await _complete(request_id, generations, texts, req))


def _token_ids(model: ServedModel, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        return model.tokenizer.encode(prompt)
    return list(prompt)


class _Choice:
    """What one choice accumulates: text, tokens, logprobs (echoed prompt first)."""

    def __init__(
        self,
        model: ServedModel,
        generation: Generation,
        req: CompletionRequest,
        prompt_text: str | None = None,
    ) -> None:
        self.model = model
        self.prompt_text = prompt_text  # a text prompt as given; None for token ids
        self.req = req
        self.text = ""
        self.offset = 0  # of the next token in the text: the text itself lags behind the
        # tokens while the detokenizer holds back a possible stop string or half a character
        self.finish_reason: str | None = None
        self.logprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        self.generation = generation

    def echo(self) -> str:
        """The prompt's text and logprobs, placed before the generated ones."""
        prompt = self.generation.prompt_token_ids
        text = self.prompt_text
        if text is None:
            text = self.model.tokenizer.decode(prompt)
        if self.req.logprobs is not None:
            entries = self.generation.prompt_logprobs or [None] * len(prompt)
            # a special token the tokenizer put in (a BOS) is not in a text prompt's text:
            # it stands at its place in the text with no width
            unwritten = set()
            if self.prompt_text is not None:
                unwritten = set(self.model.tokenizer.all_special_ids)
            self._add_logprobs(prompt, entries, text, unwritten)
        self.text += text
        self.offset = len(self.text)
        return text

    def add(self, delta: ChoiceDelta) -> str:
        self.finish_reason = delta.finish_reason or self.finish_reason
        if self.req.echo_only:
            return ""
        if self.req.logprobs is not None:
            self._add_logprobs(delta.token_ids, delta.logprobs)
        self.text += delta.text
        return delta.text

    def _add_logprobs(
        self,
        tokens: list[int],
        entries: list[TokenLogprobs | None],
        text: str = "",
        unwritten: set[int] = frozenset(),
    ) -> None:
        for token, entry in zip(tokens, entries):
            token_text = self.model.token_text(token)
            self.logprobs["tokens"].append(token_text)
            self.logprobs["text_offset"].append(self.offset)
            if token not in unwritten or text.startswith(token_text, self.offset):
                self.offset += len(token_text)
            if entry is None:
                self.logprobs["token_logprobs"].append(None)
                self.logprobs["top_logprobs"].append(None)
                continue
            self.logprobs["token_logprobs"].append(json_logprob(entry[token].logprob))
            self.logprobs["top_logprobs"].append(
                top_logprobs(self.model, token, entry, self.req.logprobs)
            )

    def body(self, index: int, text: str | None = None) -> dict:
        body = {
            "index": index,
            "text": self.text if text is None else text,
            "logprobs": self.logprobs if self.req.logprobs is not None else None,
            "finish_reason": self.finish_reason,
        }
        if self.req.prompt_logprobs is not None:  # never streamed (refused)
            body["prompt_logprobs"] = prompt_logprobs(self.generation, self.req.prompt_logprobs)
        return body


def top_logprobs(model: ServedModel, token: int, entry: TokenLogprobs, k: int) -> dict[str, float]:
    """A position's `top_logprobs` as OpenAI's legacy completions give it: the `k` likeliest
    tokens and the chosen one (so up to k + 1 entries, and the chosen token alone for k = 0),
    likeliest first, keyed by their text. Tokens whose text is the same (pieces of one
    character, each "\ufffd") share a key, which keeps the likeliest one's logprob: a client
    that takes a token as greedy when its logprob is the dict's maximum (lm-eval's is_greedy)
    must not see a less likely duplicate in place of the top token."""
    top: dict[str, float] = {}
    for t, lp in top_and_chosen(token, entry, k):
        top.setdefault(model.token_text(t), json_logprob(lp.logprob))
    return top


async def _merged(generations: list[Generation]) -> AsyncIterator[tuple[int, ChoiceDelta]]:
    """The deltas of several generations as they come, tagged with the generation's index."""
    if len(generations) == 1:
        async with aclosing(aiter(generations[0])) as deltas:
            async for delta in deltas:
                yield 0, delta
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, generation: Generation) -> None:
        try:
            async for delta in generation:
                await queue.put((i, delta))
        except Exception as exc:
            await queue.put((i, exc))
        await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(generations)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()


def _choice_index(req: CompletionRequest, prompt_index: int, delta: ChoiceDelta) -> int:
    return prompt_index * req.n + delta.index


async def _complete(
    request_id: str,
    generations: list[Generation],
    texts: list[str | None],
    req: CompletionRequest,
):
    choices: dict[int, _Choice] = {}
    async for i, delta in _merged(generations):
        index = _choice_index(req, i, delta)
        if index not in choices:
            choices[index] = _Choice(generations[i].model, generations[i], req, texts[i])
            if req.echo:
                choices[index].echo()
        choices[index].add(delta)
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": req.model,
        "choices": [choices[i].body(i) for i in sorted(choices)],
        "usage": _total_usage(generations),
        "system_fingerprint": None,
    }


async def _stream(
    request_id: str,
    generations: list[Generation],
    texts: list[str | None],
    req: CompletionRequest,
) -> AsyncIterator[str]:
    created = int(time.time())
    at_end, every_chunk = req.stream_usage()
    choices: dict[int, _Choice] = {}

    def chunk(body_choices: list[dict], **extra) -> str:
        body = {
            "id": request_id,
            "object": "text_completion",
            "created": created,
            "model": req.model,
            "system_fingerprint": None,
            "choices": body_choices,
            **({"usage": _total_usage(generations) if every_chunk else None} if at_end else {}),
            **extra,
        }
        return sse_json(body)

    async with aclosing(_merged(generations)) as merged:
        async for i, delta in merged:
            index = _choice_index(req, i, delta)
            text = ""
            choice = choices.get(index)
            seen = len(choice.logprobs["tokens"]) if choice else 0
            if choice is None:
                choice = choices[index] = _Choice(
                    generations[i].model, generations[i], req, texts[i]
                )
                if req.echo:
                    text = choice.echo()
            text += choice.add(delta)
            body = choice.body(index, text)
            if body["logprobs"] is not None:  # only this chunk's entries
                body["logprobs"] = {key: value[seen:] for key, value in choice.logprobs.items()}
            yield chunk([body])
    if at_end:
        yield chunk([], usage=_total_usage(generations))
    yield "[DONE]"


def _total_usage(generations: list[Generation]) -> dict:
    parts = [usage(g) for g in generations]
    prompt = sum(p["prompt_tokens"] for p in parts)
    completion = sum(p["completion_tokens"] for p in parts)
    cached = sum(p["prompt_tokens_details"]["cached_tokens"] for p in parts)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
