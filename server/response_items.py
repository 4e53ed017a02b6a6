"""A response's output items (OpenAI's Responses API) as the output is made, and the stream
events that tell each step: `reasoning`, `message` (one `output_text` part) and
`function_call` items, one open at a time, in the order the output has them."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field


def item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@dataclass
class OutputItems:
    items: list[dict] = field(default_factory=list)  # the finished ones, then the open one
    open: dict | None = None
    events: list[dict] = field(default_factory=list)  # not yet taken, without sequence numbers

    def reasoning(self, text: str) -> None:
        if not text:
            return
        if self.open_kind() != "reasoning":
            self._start(
                {"id": item_id("rs"), "type": "reasoning", "summary": [], "content": []},
                {"type": "reasoning_text", "text": ""},
            )
        self._append_text(text, "response.reasoning_text.delta")

    def text(self, text: str, logprobs: list[dict] | None = None) -> None:
        """Message text, with the logprobs of the tokens that wrote it (where asked for)."""
        if not text and not logprobs:
            return
        if self.open_kind() != "message":
            self._start_message()
        logprobs = logprobs or []
        self.open["content"][0]["logprobs"] += logprobs
        self._append_text(text, "response.output_text.delta", logprobs=logprobs)

    def call(self, call_id: str, name: str, arguments: str) -> None:
        """A function call begins (its arguments may follow in `arguments`)."""
        self.close()
        item = {
            "id": item_id("fc"),
            "type": "function_call",
            "call_id": call_id,
            "name": name,
            "arguments": "",
        }
        self._start(item, None)
        self.arguments(arguments)

    def arguments(self, delta: str) -> None:
        if delta:
            self.open["arguments"] += delta
            self._event("response.function_call_arguments.delta", self._ids(), delta=delta)

    def finish(self, status: str) -> list[dict]:
        """The items, the last closed with `status` ("completed", or "incomplete" where the
        output was cut); an output with no item at all is an empty message."""
        if not self.items:
            self._start_message()
        self.close(status)
        return self.items

    def take_events(self) -> list[dict]:
        events, self.events = self.events, []
        return events

    def close(self, status: str = "completed") -> None:
        item = self.open
        if item is None:
            return
        self.open = None
        item["status"] = status
        ids = self._ids(item)
        if item["type"] == "function_call":
            self._event("response.function_call_arguments.done", ids, arguments=item["arguments"])
        else:
            part = item["content"][0]
            if part["type"] == "output_text":
                done = {"text": part["text"], "logprobs": part["logprobs"]}
                self._event("response.output_text.done", ids, **done)
            else:
                self._event("response.reasoning_text.done", ids, text=part["text"])
            self._event("response.content_part.done", ids, part=part)
        self._event("response.output_item.done", {"output_index": ids["output_index"]}, item=item)

    def open_kind(self) -> str | None:
        return None if self.open is None else self.open["type"]

    def _start_message(self) -> None:
        message = {"id": item_id("msg"), "type": "message", "role": "assistant", "content": []}
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        self._start(message, part)

    def _start(self, item: dict, part: dict | None) -> None:
        self.close()
        item["status"] = "in_progress"
        self.items.append(item)
        self.open = item
        self._event("response.output_item.added", {"output_index": len(self.items) - 1}, item=item)
        if part is not None:
            item["content"].append(part)
            self._event("response.content_part.added", self._ids(), part=part)

    def _append_text(self, text: str, event: str, **extra) -> None:
        self.open["content"][0]["text"] += text
        self._event(event, self._ids(), delta=text, **extra)

    def _ids(self, item: dict | None = None) -> dict:
        item = item or self.open
        ids = {"item_id": item["id"], "output_index": self.items.index(item)}
        return ids if item["type"] == "function_call" else {**ids, "content_index": 0}

    def _event(self, kind: str, ids: dict, **fields) -> None:
        # an item is sent as it is now: later changes must not reach events not yet sent
        self.events.append({"type": kind, **ids, **_snapshot(fields)})


def _snapshot(value):
    if isinstance(value, dict):
        return {k: _snapshot(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_snapshot(v) for v in value]
    return value
