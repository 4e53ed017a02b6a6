"""Request bodies of /v1/chat/completions and /v1/completions: parsing, validation and their
translation into the engine's sampling parameters.

Every malformed body becomes an `APIError` 400 whose `param` is the dotted path of the field to
blame ("temperature", "messages.0.role"); no pydantic error reaches the caller.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pagoda.engine.sampling_defaults import SAMPLING_FIELDS
from pagoda.server.errors import APIError, invalid
from pagoda.server.request_fields import check_request_fields
from pagoda.server.request_log import log_request

__all__ = [
    "MAX_COMPLETION_LOGPROBS",
    "MAX_N",
    "MAX_STOP_STRINGS",
    "MAX_TOP_LOGPROBS",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "StreamOptions",
    "TextPart",
    "drop_nulls",
    "messages_for_template",
    "parse_body",
]

MAX_N = 128
# OpenAI takes 4; vLLM has no limit. lm-eval's local-completions sends a task's `until` strings
# and the EOS text besides: humaneval's come to 6, aime's to 5.
MAX_STOP_STRINGS = 32
MAX_TOP_LOGPROBS = 20
# OpenAI's legacy completions cap `logprobs` at 5; vLLM and our engine go to 20, and scoring
# clients that ask for more than 5 would otherwise fail for no reason.
MAX_COMPLETION_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0
MAX_BAD_WORDS = 256  # each is matched against the output at every step (vLLM has no limit)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

RequestModel = TypeVar("RequestModel", bound=BaseModel)
TokenId = Annotated[int, Field(ge=0)]


# ---------------------------------------------------------------------------------------------
# Parsing and error translation


def parse_body(model_cls: type[RequestModel], body: bytes) -> RequestModel:
    """Decode a JSON request body and validate it as `model_cls`, or raise `APIError` 400.
    Fields the model does not know are warned about, or refused (`request_fields`)."""
    data = _load_json(body)
    if not isinstance(data, dict):
        raise invalid(f"The request body must be a JSON object, not {_json_kind(data)}.")
    try:
        request = model_cls.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None
    check_request_fields(model_cls, data)
    log_request(request)
    return request


def parse_query(model_cls: type[RequestModel], params: Mapping[str, str]) -> RequestModel:
    """Validate a query string's parameters as `model_cls`, or raise `APIError` 400 naming the
    parameter."""
    try:
        return model_cls.model_validate(dict(params))
    except ValidationError as exc:
        raise validation_error(exc) from None


def _load_json(body: bytes) -> Any:
    try:
        # JSON over HTTP is UTF-8 (RFC 8259); a byte-order mark is tolerated.
        data = json.loads(
            body.decode("utf-8-sig"),
            parse_constant=_reject_constant,
            parse_float=_finite_float,
            object_pairs_hook=_unique_keys,
        )
    except (ValueError, RecursionError) as exc:
        raise invalid(f"The request body is not valid JSON: {exc}") from None
    # Both can only come in escaped. No field means a NUL, and C strings (PostgreSQL's text in
    # the usage ledger, tokenizers' C APIs, logs) cut or refuse it; a lone UTF-16 surrogate
    # (half an emoji, from a client that cut a string) is no character and no encoder takes it.
    if b"\\u" in body and (bad := _not_text(data)) is not None:
        if bad == "\x00":
            raise invalid("A string in the request contains a NUL character (\\u0000).")
        raise invalid(
            f"A string in the request contains an unpaired UTF-16 surrogate (\\u{ord(bad):04x}): "
            "half of a character, which is not text."
        )
    return data


_NOT_TEXT = re.compile("[\x00\ud800-\udfff]")


def _not_text(value: Any) -> str | None:
    """The first NUL or lone surrogate in the strings (keys included) of a decoded body."""
    if isinstance(value, str):
        found = _NOT_TEXT.search(value)
        return None if found is None else found.group()
    if isinstance(value, dict):
        parts = itertools.chain.from_iterable(value.items())
    elif isinstance(value, list):
        parts = value
    else:
        return None
    return next((bad for part in parts if (bad := _not_text(part)) is not None), None)


def _reject_constant(name: str) -> None:
    # Python's json reads NaN and Infinity, which JSON itself does not allow.
    raise ValueError(f"{name} is not a JSON value")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e999: valid JSON, but no number a request can mean
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Python's json keeps the last of duplicate keys; which one a proxy or a client library
    # reads differs, so such a body is refused rather than guessed at.
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        key = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise ValueError(f"duplicate key {key[:100]!r}")
    return result


def drop_nulls(model_cls: type[BaseModel], data: Any) -> Any:
    """The fields of a body without its optional ones sent as null: many clients send every
    optional field, the unset ones as null, meaning the default (a before-validator's job)."""
    if not isinstance(data, dict):
        return data
    fields = model_cls.model_fields
    return {
        key: value
        for key, value in data.items()
        if value is not None or (key in fields and fields[key].is_required())
    }


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    return "a boolean" if isinstance(value, bool) else "a number"


class _FieldError(ValueError):
    """A rule across fields is broken; `field` (relative to the model checked) is to blame."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def validation_error(exc: ValidationError) -> APIError:
    """A pydantic error as a 400 naming the field to blame."""
    error = exc.errors(include_url=False)[0]
    path = [str(part) for part in error["loc"]]
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, _FieldError):
        path.append(cause.field)
        message = str(cause)
    else:
        message = error["msg"].removeprefix("Value error, ")
    param = ".".join(path) or None
    return invalid(f"{param}: {message}" if param else message, param=param)


# ---------------------------------------------------------------------------------------------
# Field checks shared by both requests


def _check_stop(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError("must be a string or a list of strings")
    if len(value) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(value)}")
    return value


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_logit_bias(value: Any) -> Any:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError("must be an object mapping token ids to biases")
    bias = {}
    for key, weight in value.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit()):
            raise ValueError(f"keys must be token ids (non-negative integers), got {key!r}")
        if not _is_number(weight) or not -MAX_LOGIT_BIAS <= weight <= MAX_LOGIT_BIAS:
            raise ValueError(f"bias for token {key} must be a number in [-100, 100]")
        bias[int(key)] = float(weight)
    return bias


class StreamOptions(BaseModel):
    ignored_fields: ClassVar = frozenset({"include_obfuscation"})  # nothing is obfuscated

    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: with include_usage, usage in every chunk


class StructuredOutputFields(BaseModel):
    """vLLM's structured output fields (server/structured.py checks them)."""

    structured_outputs: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None


class _SamplingRequest(StructuredOutputFields):
    """The fields both endpoints share; the OpenAI defaults are the field defaults."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str
    # None: the model's default (its generation_config.json, engine/sampling_defaults.py),
    # else OpenAI's (temperature 1, top_p 1, no penalties)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[int, float] | None = None
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's extra sampling parameters, under vLLM's names
    top_k: int | None = Field(None, ge=-1)  # 0 or -1: disabled
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    stop_token_ids: list[TokenId] | None = None
    # each prompt token's logprob with the top N: completions' `choices[].prompt_logprobs`,
    # chat's top-level `prompt_logprobs`
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    allowed_token_ids: list[TokenId] | None = Field(None, min_length=1)
    bad_words: list[str] | None = Field(None, max_length=MAX_BAD_WORDS)
    skip_special_tokens: bool = True

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        return drop_nulls(cls, data)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> Any:
        return _check_stop(value)

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _logit_bias(cls, value: Any) -> Any:
        return _check_logit_bias(value)

    @field_validator("bad_words")
    @classmethod
    def _bad_words(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not all(word.strip() for word in value):
            raise ValueError("must be strings that are not blank")
        return value

    @model_validator(mode="after")
    def _shared_rules(self) -> _SamplingRequest:
        if self.stream_options is not None and not self.stream:
            raise _FieldError("stream_options", "only allowed when stream is true")
        if self.prompt_logprobs is not None and self.stream:  # as vLLM
            raise _FieldError("prompt_logprobs", "is not available when stream is true")
        limit = self.max_tokens_limit()
        if limit is not None and self.min_tokens > limit:
            raise _FieldError("min_tokens", f"must not exceed max_tokens ({limit})")
        return self

    def max_tokens_limit(self) -> int | None:
        """The output-length cap the client gave, or None where the server picks it."""
        raise NotImplementedError

    def stream_usage(self) -> tuple[bool, bool]:
        """Whether a stream ends with a usage chunk, and whether every chunk has the usage
        so far (vLLM's continuous_usage_stats, which needs include_usage as in vLLM)."""
        options = self.stream_options
        if options is None or not options.include_usage:
            return False, False
        return True, options.continuous_usage_stats

    def stop_strings(self) -> list[str]:
        """The stop strings (matched by the server on the text, not by the engine)."""
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        return [stop for stop in stops if stop]  # an empty string would stop at once

    def _common_sampling_kwargs(self) -> dict[str, Any]:
        """The engine's sampling fields; those with a model default only where the client set
        them (ServedModel.sampling_params fills in the rest)."""
        defaulted = {name: getattr(self, name) for name in SAMPLING_FIELDS}
        return {
            **{name: value for name, value in defaulted.items() if value is not None},
            "n": self.n,
            "seed": self.seed,
            "logit_bias": dict(self.logit_bias) if self.logit_bias else None,
            "min_tokens": self.min_tokens,
            "ignore_eos": self.ignore_eos,
            "include_stop_str_in_output": self.include_stop_str_in_output,
            "stop_token_ids": list(self.stop_token_ids or []),
            "allowed_token_ids": self.allowed_token_ids,
            "bad_words": self.bad_words,
            "skip_special_tokens": self.skip_special_tokens,
        }


# ---------------------------------------------------------------------------------------------
# Chat completions

Role = Literal["system", "developer", "user", "assistant", "tool"]


class TextPart(BaseModel):
    ignored_fields: ClassVar = frozenset({"prompt_cache_breakpoint"})

    type: Literal["text"]
    text: str


def _check_content(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise ValueError("must be a string, a list of content parts, or null")
    for index, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            raise ValueError(
                f"part {index} has type {kind!r}: only text content parts are supported"
            )
        if not isinstance(part.get("text"), str):
            raise ValueError(f"part {index} must have a string 'text'")
    return value


class ChatMessage(BaseModel):
    # what an assistant message of a response carries when a client sends it back
    ignored_fields: ClassVar = frozenset({"refusal", "annotations", "audio", "function_call"})

    role: Role
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    # an assistant turn's thinking, sent back (vLLM's name, and DeepSeek's): the templates
    # of reasoning models read reasoning_content
    reasoning: str | None = None
    reasoning_content: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, value: Any) -> Any:
        return _check_content(value)

    @field_validator("tool_calls")
    @classmethod
    def _tool_calls(cls, value: list[dict[str, Any]] | None) -> Any:
        for index, call in enumerate(value or ()):
            function = call.get("function")
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise ValueError(f"call {index} needs a 'function' object with a string 'name'")
            if not isinstance(function.get("arguments"), str | dict):  # a dict: Ollama's habit
                raise ValueError(f"call {index}'s function needs 'arguments', a JSON string")
        return value

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise _FieldError("content", "may be null only in an assistant message with tool_calls")
        return self

    def text(self) -> str:
        """The content as one string: text parts joined by newlines (as vLLM does)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


# apply_chat_template's own arguments, which chat_template_kwargs must not set
_TEMPLATE_ARGUMENTS = frozenset(
    {
        "conversation",
        "messages",
        "tools",
        "documents",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
    }
)


class ChatTemplateOptions(BaseModel):
    """vLLM's fields for how the messages become the prompt."""

    add_generation_prompt: bool = True  # end with the assistant's header
    continue_final_message: bool = False  # end inside the last (assistant) message: a prefill
    chat_template_kwargs: dict[str, Any] | None = None  # the template's own variables

    @model_validator(mode="after")
    def _template_rules(self) -> ChatTemplateOptions:
        if self.continue_final_message:
            if self.add_generation_prompt:
                raise _FieldError(
                    "continue_final_message", "needs add_generation_prompt to be false"
                )
            if self.messages and self.messages[-1].role != "assistant":
                raise _FieldError(
                    "continue_final_message", "needs the last message to be the assistant's"
                )
        if reserved := sorted(_TEMPLATE_ARGUMENTS & set(self.chat_template_kwargs or ())):
            raise _FieldError(
                "chat_template_kwargs", f"{reserved[0]} is a request field or not a variable"
            )
        return self


class ChatCompletionRequest(ChatTemplateOptions, _SamplingRequest):
    # OpenAI fields with no effect here: storage, billing, caching and safety hints
    ignored_fields: ClassVar = frozenset(
        {
            "metadata",
            "store",
            "service_tier",
            "prompt_cache_key",
            "prompt_cache_options",
            "prompt_cache_retention",
            "safety_identifier",
            "reasoning_effort",
            "verbosity",
        }
    )

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # deprecated by OpenAI for the one below
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    # Checked by server/tools.py and server/structured.py.
    tools: Any = None
    tool_choice: Any = None
    response_format: Any = None
    parallel_tool_calls: bool | None = None
    include_reasoning: bool = True  # vLLM's: false leaves the thinking out of the response

    @model_validator(mode="after")
    def _chat_rules(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise _FieldError("top_logprobs", "requires logprobs to be true")
        return self

    def max_tokens_limit(self) -> int | None:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    def sampling_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `engine.SamplingParams`. `max_tokens` is None when the client
        gave no limit: the server fills it from the room left in the context."""
        return {
            **self._common_sampling_kwargs(),
            "max_tokens": self.max_tokens_limit(),
            "logprobs": (self.top_logprobs or 0) if self.logprobs else None,
            "prompt_logprobs": self.prompt_logprobs,
        }


def messages_for_template(req: ChatCompletionRequest | TokenizeRequest) -> list[dict[str, Any]]:
    """The messages as plain dicts for transformers' `apply_chat_template`."""
    return [_template_message(message) for message in req.messages]


def _template_message(message: ChatMessage) -> dict[str, Any]:
    # Most chat templates know no "developer" role; OpenAI treats it as the system prompt.
    role = "system" if message.role == "developer" else message.role
    out: dict[str, Any] = {"role": role, "content": message.text()}
    if message.name is not None:
        out["name"] = message.name
    if message.tool_calls:
        out["tool_calls"] = [_template_tool_call(call) for call in message.tool_calls]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    reasoning = message.reasoning_content or message.reasoning
    if reasoning is not None:
        out["reasoning_content"] = reasoning
    return out


def _template_tool_call(call: dict[str, Any]) -> dict[str, Any]:
    # OpenAI sends `arguments` as a JSON string; chat templates expect an object and would
    # otherwise print it JSON-encoded twice.
    function = call["function"]  # checked by ChatMessage
    if not isinstance(function["arguments"], str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except ValueError:
        return call
    if not isinstance(arguments, dict):
        return call
    return {**call, "function": {**function, "arguments": arguments}}


# ---------------------------------------------------------------------------------------------
# (Legacy) completions


def _check_token_ids(value: Any, where: str) -> None:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where} must not be an empty list of token ids")
    if not all(_is_token_id(token) for token in value):
        raise ValueError(f"{where}: token ids must be non-negative integers")


def check_prompt_shape(value: Any, name: str = "prompt") -> Any:
    """A string, a list of strings, a list of token ids or a list of token-id lists (the
    shapes /v1/completions' `prompt` and /v1/embeddings' `input` take), else ValueError."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise ValueError(
            "must be a string, a list of strings, a list of token ids or a list of such lists"
        )
    if not value:
        raise ValueError("must not be an empty list")
    if all(isinstance(item, str) for item in value):
        return value
    if all(isinstance(item, list) for item in value):
        for index, item in enumerate(value):
            _check_token_ids(item, f"{name} {index}")
    elif any(isinstance(item, (str, list)) for item in value):
        raise ValueError("must not mix strings, token ids and lists of token ids")
    else:
        _check_token_ids(value, name)
    return value


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    # 0 is allowed with echo only: scoring the prompt without generating.
    max_tokens: int = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any) -> Any:
        return check_prompt_shape(value)

    @model_validator(mode="after")
    def _completion_rules(self) -> CompletionRequest:
        if self.suffix:
            raise _FieldError("suffix", "is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise _FieldError("best_of", "is supported only when null or equal to n")
        if self.max_tokens == 0 and not self.echo:
            raise _FieldError("max_tokens", "must be at least 1 (0 is allowed only with echo)")
        return self

    @property
    def echo_only(self) -> bool:
        """max_tokens 0 with echo: the answer is the prompt alone; discard what is generated."""
        return self.max_tokens == 0

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompt as a batch: one entry per prompt (text or token ids)."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(item, int) for item in self.prompt):
            return [self.prompt]
        return self.prompt

    def max_tokens_limit(self) -> int | None:
        return self.max_tokens

    def sampling_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `engine.SamplingParams` (max_tokens 0: the prompt only)."""
        # each prompt token gets as many alternatives as the echo's logprobs or
        # prompt_logprobs ask, the larger
        asked = [
            k for k in (self.logprobs if self.echo else None, self.prompt_logprobs) if k is not None
        ]
        return {
            **self._common_sampling_kwargs(),
            "max_tokens": self.max_tokens,
            "logprobs": self.logprobs,
            "prompt_logprobs": max(asked, default=None),
        }


# ---------------------------------------------------------------------------------------------
# vLLM's tokenizer endpoints (lm-eval and other clients use them to count tokens remotely)


class TokenizeRequest(ChatTemplateOptions):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # as in vLLM: the first served model (lm-eval sends none)
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True  # for `prompt`
    # for `messages`: the prompt a chat request with these tools would have
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    return_token_strs: bool = False  # each token's vocabulary piece too, as vLLM gives them

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise _FieldError("prompt", "give exactly one of prompt and messages")
        if self.tools is not None and self.messages is None:
            raise _FieldError("tools", "apply to messages, not to a prompt")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[TokenId]
