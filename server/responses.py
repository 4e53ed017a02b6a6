"""POST /v1/responses (OpenAI's Responses API), JSON and SSE, and GET/DELETE of the stored ones.

A response is the chat completion of its conversation (server/chat.py's prompt, tools, grammar
and engine request): previous_response_id's conversation, then the input, with the
instructions as the system message. Its output items come from the same parsers as chat's
message: the reasoning parser's thinking, the text, the tool parser's calls."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

from starlette.background import BackgroundTask
from starlette.responses import JSONResponse, Response

from pagoda.server.chat import logprob_content, split_delta, start_generation
from pagoda.server.errors import invalid
from pagoda.server.generation import Generation, ServedModel, event_stream, sse_json
from pagoda.server.keys.meter import Meter
from pagoda.server.metrics import Metrics
from pagoda.server.response_items import OutputItems
from pagoda.server.response_runs import BackgroundRun
from pagoda.server.response_store import ResponseStore, StoredResponse, owner_of
from pagoda.server.responses_request import ResponsesRequest, input_messages, listed_input
from pagoda.server.structured import text_format_constraint
from pagoda.server.tools import ToolCallStream, ToolPlan, plan_tools
from pagoda.server.worker_client import WorkerDeadError

logger = logging.getLogger("pagoda")
DONE = ("stop", "tool_calls")  # the finish reasons of a complete output
DROPPED = "The server stopped generating before the response was complete."


async def create_response(
    model: ServedModel,
    req: ResponsesRequest,
    metrics: Metrics,
    meter: Meter,
    store: ResponseStore,
):
    if (refused := req.refused_field()) is not None:
        raise invalid(refused[1], param=refused[0])
    stored = req.store and store.enabled
    if req.background and not stored:
        raise invalid(
            "background: a background response is stored to be read later: it needs store "
            "true (and a server keeping responses: --max-stored-responses above 0)",
            param="background",
        )
    owner = owner_of(meter)
    history = []
    if req.previous_response_id is not None:
        previous = store.get(req.previous_response_id, owner, "previous_response_id")
        if previous.body["status"] in ("queued", "in_progress"):  # a background one
            raise invalid(
                "previous_response_id: that response is still being made: wait until it ends",
                param="previous_response_id",
            )
        history = previous.messages
    messages = [*history, *input_messages(req.input)]
    tools = plan_tools(req, model.tool_call_parser, model.supports_tools, flat=True)
    output_format = ("text.format", text_format_constraint(req.text))
    generation = await start_generation(
        model,
        req.chat_request(messages),
        tools,
        output_format,
        metrics,
        meter,
        f"resp_{uuid.uuid4().hex}",
        prompt_param="input",
    )
    response = _Response(generation, req, tools if tools and tools.mode != "none" else None)
    saved = (
        StoredResponse(response.body, messages, owner, listed_input(req.input)) if stored else None
    )
    response.body["store"] = stored

    def keep() -> None:
        if saved is not None:  # the output's items join the conversation a follow-up continues
            saved.messages = [*messages, *input_messages(response.body["output"], "output")]
            store.put(saved)

    if req.background:
        return _start_background(response, saved, store, meter, keep)
    if req.stream:
        return event_stream(_stream(response, meter, keep), meter)
    async with aclosing(response.run()) as events:
        async for _ in events:
            pass
    keep()
    return JSONResponse(response.body)


def _start_background(
    response: _Response, saved: StoredResponse, store: ResponseStore, meter: Meter, keep
) -> Response:
    """Answer at once (the response `queued`, or its events as they come) while a task of its
    own makes it; the request lasts until it ends, so that the drain waits for it and its key
    is billed for all of it, but its client may leave."""
    body = response.body
    body["background"], body["status"] = True, "queued"

    def cancelled() -> None:
        response.end("cancelled")
        keep()
        meter.release()

    saved.run = run = BackgroundRun(_stream(response, meter, keep, background=True), cancelled)
    store.put(saved)  # found by GET, cancel and previous_response_id while it runs
    meter.detached = True  # the key's slot is held until the run ends, not the answer
    if response.stream:
        return event_stream(run.follow(), meter, BackgroundTask(run.wait))
    return JSONResponse(body, background=BackgroundTask(run.wait))


class _Response:
    """The response object of one generation, made as its output comes."""

    def __init__(self, generation: Generation, req: ResponsesRequest, tools: ToolPlan | None):
        self.generation = generation
        self.stream = req.stream
        self.tools = tools
        self.items = OutputItems()
        parser = generation.model.reasoning
        self.thinking = parser.stream(generation.prompt_token_ids) if parser else None
        # each token's top alternatives, where the output text carries logprobs
        self.logprobs = (req.top_logprobs or 0) if req.output_logprobs else None
        params = generation.params
        self.body = {
            "id": generation.request_id,
            "object": "response",
            "created_at": int(time.time()),
            "status": "in_progress",
            "background": False,
            "error": None,
            "incomplete_details": None,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "metadata": req.metadata or {},
            "model": req.model,
            "output": self.items.items,  # filled as the output comes (a background GET)
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": None, "summary": None},
            "temperature": params.temperature,
            "text": {"format": (req.text or {}).get("format") or {"type": "text"}},
            "tool_choice": req.tool_choice or "auto",
            "tools": req.tools or [],
            "top_logprobs": req.top_logprobs or 0,
            "top_p": params.top_p,
            "truncation": "disabled",
            "usage": None,
            "user": req.user,
        }

    async def run(self) -> AsyncIterator[dict]:
        """The output's events, while the body's output and usage fill in.

        With logprobs, each token's entry goes with the message text it wrote; a token whose
        text is held back (a stop string's start, a tool call's) waits for the next text. The
        entries of the thinking's tokens and of function calls' are dropped: OpenAI gives the
        message text's only."""
        generation, items, thinking = self.generation, self.items, self.thinking
        calls = ToolCallStream(self.tools) if self.tools is not None else None
        finish = None
        held: list[dict] = []
        async with aclosing(aiter(generation)) as deltas:
            async for delta in deltas:
                text, finish = delta.text, delta.finish_reason
                if self.logprobs is not None:
                    held += logprob_content(generation.model, delta, self.logprobs)
                if thinking is not None:
                    reasoning, text = split_delta(thinking, delta)
                    items.reasoning(reasoning)
                    if reasoning and not text:
                        held = []
                if calls is not None:
                    text, held = self._tool_output(calls, text, held, finish is not None)
                if text:
                    items.text(text, held)
                    held = []
                for event in items.take_events():
                    yield event
        if held and items.open_kind() in (None, "message"):  # an EOS, a stop string
            items.text("", held)
        self.end(finish)
        for event in items.take_events():
            yield event

    def _tool_output(
        self, calls: ToolCallStream, text: str, held: list[dict], last: bool
    ) -> tuple[str, list[dict]]:
        """(the text that is the message's, the logprobs still held)."""
        content, deltas = calls.feed(text)
        if last:
            rest, more = calls.finish()
            content, deltas = content + rest, deltas + more
        if content:
            self.items.text(content, held)
            held = []
        for delta in deltas:
            held = []  # the call's tokens
            function = delta["function"]
            if "id" in delta:
                self.items.call(delta["id"], function["name"], function["arguments"])
            else:
                self.items.arguments(function["arguments"])
        return "", held

    def end(self, finish: str | None, error: str = DROPPED) -> None:
        """Complete the body: its status from the finish reason ("cancelled": a background
        response's cancel; None: the engine dropped it or failed), its output and usage."""
        body, generation = self.body, self.generation
        if finish == "length":
            body["status"] = "incomplete"
            body["incomplete_details"] = {"reason": "max_output_tokens"}
        elif finish in ("stop", "tool_calls"):
            body["status"] = "completed"
            body["completed_at"] = int(time.time())
        elif finish == "cancelled":
            body["status"] = "cancelled"
        else:
            body["status"] = "failed"
            body["error"] = {"code": "server_error", "message": error}
        body["output"] = self.items.finish("completed" if finish in DONE else "incomplete")
        body["usage"] = {
            "input_tokens": generation.prompt_tokens,
            "input_tokens_details": {
                "cached_tokens": generation.cached_tokens,
                "cache_write_tokens": 0,  # no cache writes are billed
            },
            "output_tokens": generation.completion_tokens,
            "output_tokens_details": {
                "reasoning_tokens": self.thinking.reasoning_tokens if self.thinking else 0
            },
            "total_tokens": generation.prompt_tokens + generation.completion_tokens,
        }


async def _stream(
    response: _Response, meter: Meter, keep, background: bool = False
) -> AsyncIterator[str | dict]:
    """OpenAI's events, each named in its SSE `event:` and numbered; no `[DONE]` follows the
    last (response.completed, or response.incomplete / response.failed), as OpenAI's. A
    background response that fails says so in its last event (response.failed, with the error)
    and is kept: a client may read it later; a client's own stream is told by event_stream."""
    sequence = 0

    def event(payload: dict) -> dict:
        nonlocal sequence
        payload["sequence_number"] = sequence
        sequence += 1
        return {"event": payload["type"], "data": sse_json(payload)}

    body = response.body
    yield event({"type": "response.created", "response": dict(body)})
    if body["status"] == "queued":
        yield event({"type": "response.queued", "response": dict(body)})
        body["status"] = "in_progress"
    yield event({"type": "response.in_progress", "response": dict(body)})
    try:
        async with aclosing(response.run()) as events:
            async for payload in events:
                yield event(payload)
    except Exception as exc:  # a background response is read later: it tells its failure
        if not background:
            raise  # event_stream tells its client
        told = isinstance(exc, (WorkerDeadError, ValueError))  # a drain, a dead engine
        logger.log(
            logging.WARNING if told else logging.ERROR,
            "background response %s failed: %s",
            body["id"],
            exc,
            exc_info=not told,
        )
        response.end(None, str(exc) if told else "The server failed to make the response.")
    keep()
    kind = {"completed": "completed", "incomplete": "incomplete"}.get(body["status"], "failed")
    last = event({"type": f"response.{kind}", "response": body})
    meter.release()  # a client may send its next request on reading the last event
    yield last
