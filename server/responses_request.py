"""The body of POST /v1/responses (OpenAI's Responses API), and its input items turned into the
messages of a chat completion: a response is the chat completion of that conversation, with
the same prompt and the same engine request (server/chat.py).

Input items: messages (roles user, system, developer, assistant; text parts), `function_call`
and `function_call_output` (a tool round trip), `reasoning` (an earlier output's thinking, sent
back). Anything else, and every field that asks for what cannot run here, is a 400 naming it.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from pagoda.server.errors import invalid
from pagoda.server.protocol import (
    INT64_MAX,
    INT64_MIN,
    ChatCompletionRequest,
    StructuredOutputFields,
    drop_nulls,
    validation_error,
)
from pagoda.server.response_items import item_id
from pagoda.server.structured import GUIDED_FIELDS

# the ids OpenAI's items have, by type
ITEM_ID_PREFIXES = {
    "message": "msg",
    "function_call": "fc",
    "function_call_output": "fco",
    "reasoning": "rs",
}
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512  # OpenAI's limits
TEXT_PARTS = ("input_text", "output_text")
# fields that ask for what pagoda cannot do: refused by name when given (not null)
REFUSED = {
    "conversation": "the Conversations API is not served: send previous_response_id or the items",
    "prompt": "saved prompts are not served: send instructions and input",
    "context_management": "server-side compaction is not supported",
    "moderation": "no moderation model runs here",
}


OUTPUT_LOGPROBS = "message.output_text.logprobs"  # the `include` entry that asks for them
# `include` entries with nothing to add: reasoning is sent in plain (nothing is encrypted),
# and the others concern hosted tools' calls and image inputs, which cannot occur here
NOTHING_TO_INCLUDE = frozenset(
    {
        "reasoning.encrypted_content",
        "file_search_call.results",
        "web_search_call.results",
        "web_search_call.action.sources",
        "message.input_image.image_url",
        "computer_call_output.output.image_url",
        "code_interpreter_call.outputs",
    }
)


class ResponsesRequest(StructuredOutputFields):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    # accepted without effect: billing, caching and safety hints, a reasoning-effort control
    # the served models lack (Qwen3's thinking switch is chat_template_kwargs), hosted tools'
    # call limit, stream obfuscation
    ignored_fields: ClassVar = frozenset(
        {
            "service_tier",
            "prompt_cache_key",
            "prompt_cache_retention",
            "prompt_cache_options",
            "safety_identifier",
            "reasoning",
            "max_tool_calls",
            "stream_options",
        }
    )

    model: str
    input: str | list[Any]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    # checked by server/tools.py (flat: the function's fields beside its type) and
    # server/structured.py
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    text: Any = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    store: bool = True
    previous_response_id: str | None = None
    stream: bool = False
    include: list[str] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    truncation: Literal["auto", "disabled"] | None = None
    background: bool | None = None
    conversation: Any = None
    prompt: Any = None
    context_management: Any = None
    moderation: Any = None
    # vLLM's extensions (the SDK sends them in extra_body), as on chat
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    chat_template_kwargs: dict[str, Any] | None = None
    logit_bias: Any = None  # checked as chat's

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        return drop_nulls(cls, data)

    @field_validator("input")
    @classmethod
    def _input(cls, value: str | list[Any]) -> str | list[Any]:
        if not value:
            raise ValueError("must not be empty")
        return value

    @field_validator("tools")
    @classmethod
    def _tools(cls, value: Any) -> Any:
        return None if value == [] else value  # OpenAI's Responses API takes it (chat's not)

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return None
        if len(value) > MAX_METADATA_PAIRS:
            raise ValueError(f"at most {MAX_METADATA_PAIRS} key-value pairs")
        for key, text in value.items():
            if len(key) > MAX_METADATA_KEY or len(text) > MAX_METADATA_VALUE:
                raise ValueError(
                    f"keys are at most {MAX_METADATA_KEY} characters, values "
                    f"{MAX_METADATA_VALUE} (at {key[:MAX_METADATA_KEY]!r})"
                )
        return value

    def refused_field(self) -> tuple[str, str] | None:
        """(param, message) of the first field given that asks for what cannot run here."""
        for name, why in REFUSED.items():
            if getattr(self, name) not in (None, False):
                return name, f"{name}: {why}"
        for entry in self.include or ():
            if entry not in NOTHING_TO_INCLUDE and entry != OUTPUT_LOGPROBS:
                return "include", f"include: {entry!r}: not includable"
        if self.truncation == "auto":
            return "truncation", (
                "truncation: 'auto' (dropping the conversation's first items) is not "
                "supported; a conversation longer than the context is a 400"
            )
        return None

    @property
    def output_logprobs(self) -> bool:
        """Whether the output text carries its tokens' logprobs: `include` asks for them,
        `top_logprobs` only says how many alternatives each has (as OpenAI's and vLLM's)."""
        return OUTPUT_LOGPROBS in (self.include or ())

    def chat_request(self, messages: list[dict]) -> ChatCompletionRequest:
        """The chat completion request of the conversation `messages` (instructions first)."""
        if self.instructions is not None:
            messages = [{"role": "system", "content": self.instructions}, *messages]
        fields = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_completion_tokens": self.max_output_tokens,
            "seed": self.seed,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "chat_template_kwargs": self.chat_template_kwargs,
            "logit_bias": self.logit_bias,
            "logprobs": self.output_logprobs,
            "top_logprobs": self.top_logprobs if self.output_logprobs else None,
            **{name: getattr(self, name) for name in ("structured_outputs", *GUIDED_FIELDS)},
        }
        body = {"model": self.model, "messages": messages, "stream": self.stream, **fields}
        try:
            return ChatCompletionRequest.model_validate(body)
        except ValidationError as exc:  # checked on this request already, but for the names
            raise validation_error(exc) from None


def input_messages(items: str | list[Any], param: str = "input") -> list[dict]:
    """The chat messages of `input`: a string is a user message. An assistant's function calls
    join its message right before them (a model that wrote text and then calls made one turn),
    and a reasoning item's text goes to the assistant turn after it."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict] = []
    reasoning: list[str] = []
    turn: dict | None = None  # the assistant turn that function calls may still join
    for index, item in enumerate(items):
        where = f"{param}.{index}"
        if not isinstance(item, dict):
            raise invalid(f"{where}: must be an object (an input item)", param=where)
        kind = item.get("type", "message" if "role" in item else None)
        if kind is None:
            raise invalid(f"{where}: an item needs a type (or a role)", param=f"{where}.type")
        if kind == "reasoning":
            reasoning += _reasoning_texts(item, where)
            continue
        if kind == "message":
            message = _message(item, where)
        elif kind == "function_call":
            call = _function_call(item, where)
            if turn is not None:
                turn.setdefault("tool_calls", []).append(call)
                continue
            message = {"role": "assistant", "content": None, "tool_calls": [call]}
        elif kind == "function_call_output":
            message = _function_output(item, where)
        else:
            raise invalid(
                f"{where}.type: {kind!r} items are not supported; the input takes messages, "
                "function_call, function_call_output and reasoning items",
                param=f"{where}.type",
            )
        if message["role"] == "assistant" and reasoning:
            message["reasoning"] = "".join(reasoning)
            reasoning = []
        turn = message if message["role"] == "assistant" else None
        messages.append(message)
    return messages


def listed_input(value: str | list[Any]) -> list[dict]:
    """`input` as GET /v1/responses/{id}/input_items lists it (checked by input_messages
    first): each item with its type and an id (its own, or a new one), a message's string
    content as one text part."""
    items = [{"role": "user", "content": value}] if isinstance(value, str) else value
    return [_listed_item(dict(item)) for item in items]


def _listed_item(item: dict) -> dict:
    kind = item.setdefault("type", "message")
    item.setdefault("id", item_id(ITEM_ID_PREFIXES[kind]))
    if kind == "message" and isinstance(item["content"], str):
        if item["role"] == "assistant":
            part = {"type": "output_text", "text": item["content"], "annotations": []}
        else:
            part = {"type": "input_text", "text": item["content"]}
        item["content"] = [part]
    if kind != "reasoning":
        item.setdefault("status", "completed")
    return item


def _text(value: Any, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise invalid(f"{where}.{field}: must be a string", param=f"{where}.{field}")
    return value


def _message(item: dict, where: str) -> dict:
    role = item.get("role")
    if role not in ("user", "system", "developer", "assistant"):
        raise invalid(
            f"{where}.role: must be 'user', 'system', 'developer' or 'assistant'",
            param=f"{where}.role",
        )
    return {"role": role, "content": _content(item.get("content"), f"{where}.content")}


def _content(content: Any, where: str) -> str | list[dict]:
    """A string, or the text parts as chat's (joined as chat joins them)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"{where}: must be a string or a list of content parts", param=where)
    parts = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "refusal":  # an earlier reply's refusal, sent back
            parts.append({"type": "text", "text": _text(part.get("refusal"), where, "refusal")})
            continue
        if kind not in TEXT_PARTS:
            raise invalid(
                f"{where}.{index}.type: {kind!r} parts are not supported: only text "
                "(input_text, output_text) reaches the served models",
                param=f"{where}.{index}.type",
            )
        parts.append({"type": "text", "text": _text(part.get("text"), f"{where}.{index}", "text")})
    return parts


def _function_call(item: dict, where: str) -> dict:
    return {
        "id": _text(item.get("call_id"), where, "call_id"),
        "type": "function",
        "function": {
            "name": _text(item.get("name"), where, "name"),
            "arguments": _text(item.get("arguments"), where, "arguments"),
        },
    }


def _function_output(item: dict, where: str) -> dict:
    output = item.get("output")
    if not isinstance(output, str):
        # a list of content parts: of those, text only
        parts = _content(output, f"{where}.output")
        output = "\n".join(part["text"] for part in parts)
    return {
        "role": "tool",
        "tool_call_id": _text(item.get("call_id"), where, "call_id"),
        "content": output,
    }


def _reasoning_texts(item: dict, where: str) -> list[str]:
    """The thinking of a reasoning item (its `reasoning_text` parts); a summary or an
    encrypted content alone carries none."""
    content = item.get("content") or []
    if not isinstance(content, list):
        raise invalid(f"{where}.content: must be a list", param=f"{where}.content")
    return [
        _text(part.get("text"), f"{where}.content.{i}", "text")
        for i, part in enumerate(content)
        if isinstance(part, dict) and part.get("type") == "reasoning_text"
    ]
