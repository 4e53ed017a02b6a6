"""Request parsing and validation: every bad body is a 400 naming its field; good ones map onto
the engine's SamplingParams."""

import json

import pytest

from pagoda.engine import SamplingParams
from pagoda.engine.sampling_defaults import SAMPLING_FIELDS
from pagoda.server.errors import APIError
from pagoda.server.protocol import (
    MAX_STOP_STRINGS,
    ChatCompletionRequest,
    CompletionRequest,
    messages_for_template,
    parse_body,
)

MESSAGES = [{"role": "user", "content": "Hello"}]


def chat(**fields) -> dict:
    return {"model": "m", "messages": MESSAGES, **fields}


def completion(**fields) -> dict:
    return {"model": "m", "prompt": "Once upon a time", **fields}


def encode(body) -> bytes:
    return body if isinstance(body, bytes) else json.dumps(body).encode()


def parse_chat(body) -> ChatCompletionRequest:
    return parse_body(ChatCompletionRequest, encode(body))


def parse_completion(body) -> CompletionRequest:
    return parse_body(CompletionRequest, encode(body))


def rejected(model_cls, body) -> APIError:
    with pytest.raises(APIError) as info:
        parse_body(model_cls, encode(body))
    error = info.value
    assert error.status == 400
    assert error.body()["error"]["type"] == "invalid_request_error"
    assert error.code is None
    return error


@pytest.mark.parametrize("body", [b"{not json", b"", b'{"model": "m",}', b"\xff\xfe{}"])
def test_invalid_json(body):
    error = rejected(ChatCompletionRequest, body)
    assert error.param is None
    assert "not valid JSON" in error.message


@pytest.mark.parametrize("body", [b'{"temperature": NaN}', b'{"top_p": Infinity}'])
def test_non_standard_json_constants(body):
    assert "not valid JSON" in rejected(ChatCompletionRequest, body).message


@pytest.mark.parametrize("body", [b"[]", b'"hello"', b"42", b"null", b"true"])
def test_body_must_be_an_object(body):
    error = rejected(ChatCompletionRequest, body)
    assert error.param is None
    assert "JSON object" in error.message


BAD_CHAT = [
    ({"model": "m"}, "messages"),
    ({"messages": MESSAGES}, "model"),
    (chat(messages=[]), "messages"),
    (chat(messages=None), "messages"),
    (chat(messages=[{"role": "robot", "content": "hi"}]), "messages.0.role"),
    (chat(messages=[*MESSAGES, {"content": "hi"}]), "messages.1.role"),
    (chat(messages=[{"role": "user"}]), "messages.0.content"),
    (chat(messages=[{"role": "user", "content": 7}]), "messages.0.content"),
    (
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
        "messages.0.content",
    ),
    (chat(messages=[{"role": "user", "content": [{"type": "text"}]}]), "messages.0.content"),
    (chat(messages=[{"role": "assistant", "content": None}]), "messages.0.content"),
    (chat(temperature=2.5), "temperature"),
    (chat(temperature=-1), "temperature"),
    (chat(top_p=0), "top_p"),
    (chat(top_p=1.5), "top_p"),
    (chat(n=0), "n"),
    (chat(n=129), "n"),
    (chat(max_tokens=-1), "max_tokens"),
    (chat(max_tokens=0), "max_tokens"),
    (chat(max_completion_tokens=0), "max_completion_tokens"),
    (chat(stop=["a"] * (MAX_STOP_STRINGS + 1)), "stop"),
    (chat(stop=[1]), "stop"),
    (chat(logprobs=True, top_logprobs=21), "top_logprobs"),
    (chat(top_logprobs=2), "top_logprobs"),
    (chat(logprobs=False, top_logprobs=2), "top_logprobs"),
    (chat(stream_options={"include_usage": True}), "stream_options"),
    (chat(stream=False, stream_options={"include_usage": True}), "stream_options"),
    (chat(logit_bias={"hello": 5}), "logit_bias"),
    (chat(logit_bias={"-3": 5}), "logit_bias"),
    (chat(logit_bias={"50": 101}), "logit_bias"),
    (chat(presence_penalty=2.5), "presence_penalty"),
    (chat(frequency_penalty=-3), "frequency_penalty"),
    (chat(seed="abc"), "seed"),
    (chat(top_k=-2), "top_k"),
    (chat(min_p=1.5), "min_p"),
    (chat(repetition_penalty=0), "repetition_penalty"),
    (chat(min_tokens=-1), "min_tokens"),
    (chat(max_tokens=4, min_tokens=5), "min_tokens"),
    (chat(prompt_logprobs=21), "prompt_logprobs"),
    (chat(prompt_logprobs=1, stream=True), "prompt_logprobs"),
    (chat(allowed_token_ids=[]), "allowed_token_ids"),
    (chat(allowed_token_ids=[5, -1]), "allowed_token_ids.1"),
    (chat(bad_words="word"), "bad_words"),
    (chat(bad_words=["ok", ""]), "bad_words"),
    (chat(bad_words=["w"] * 257), "bad_words"),
]


@pytest.mark.parametrize(("body", "param"), BAD_CHAT)
def test_bad_chat_request(body, param):
    error = rejected(ChatCompletionRequest, body)
    assert error.param == param
    assert error.message.startswith(f"{param}: ")


def test_overflowing_number_is_not_infinity():
    # Python's json reads 1e400 as inf: refused while parsing, in any field (free-form ones too)
    for field in ("repetition_penalty", "tools"):
        body = b'{"model": "m", "messages": [], "FIELD": 1e400}'.replace(b"FIELD", field.encode())
        body = body.replace(b"[]", json.dumps(MESSAGES).encode())
        assert "the number 1e400 is out of range" in rejected(ChatCompletionRequest, body).message


def test_messages_are_readable():
    error = rejected(ChatCompletionRequest, chat(temperature=2.5))
    assert error.message == "temperature: Input should be less than or equal to 2"
    error = rejected(ChatCompletionRequest, chat(messages=[{"role": "user", "content": [{}]}]))
    assert "only text content parts are supported" in error.message


BAD_COMPLETION = [
    ({"model": "m"}, "prompt"),
    (completion(prompt=None), "prompt"),
    (completion(prompt=[]), "prompt"),
    (completion(prompt=[[]]), "prompt"),
    (completion(prompt=[[1, 2], []]), "prompt"),
    (completion(prompt=[1, -2]), "prompt"),
    (completion(prompt=[1, 2.5]), "prompt"),
    (completion(prompt=[True]), "prompt"),
    (completion(prompt=["a", 1]), "prompt"),
    (completion(prompt={"text": "a"}), "prompt"),
    (completion(suffix="the end"), "suffix"),
    (completion(max_tokens=-1), "max_tokens"),
    (completion(max_tokens=0), "max_tokens"),
    (completion(logprobs=21), "logprobs"),
    (completion(prompt_logprobs=21), "prompt_logprobs"),
    (completion(prompt_logprobs=-1), "prompt_logprobs"),
    (completion(prompt_logprobs=1, stream=True), "prompt_logprobs"),
    (completion(best_of=3), "best_of"),
    (completion(n=2, best_of=3), "best_of"),
    (completion(temperature=2.5), "temperature"),
    (completion(stop=["a"] * (MAX_STOP_STRINGS + 1)), "stop"),
    (completion(stream_options={"include_usage": True}), "stream_options"),
    (completion(logit_bias={"x1": 1.0}), "logit_bias"),
]


@pytest.mark.parametrize(("body", "param"), BAD_COMPLETION)
def test_bad_completion_request(body, param):
    assert rejected(CompletionRequest, body).param == param


def test_chat_defaults_follow_openai():
    """Unset sampling fields are left to the model's defaults (its generation_config.json),
    whose own defaults are OpenAI's."""
    kwargs = parse_chat(chat()).sampling_kwargs()
    assert not set(SAMPLING_FIELDS) & set(kwargs)
    assert (SamplingParams().temperature, SamplingParams().top_p) == (1.0, 1.0)
    assert parse_chat(chat(temperature=0.5)).sampling_kwargs()["temperature"] == 0.5
    assert kwargs["n"] == 1
    assert kwargs["max_tokens"] is None  # the server fills it from the context room
    assert kwargs["logprobs"] is None


def test_null_means_default():
    req = parse_chat(chat(temperature=None, n=None, stop=None, stream=None, max_tokens=None))
    assert (req.temperature, req.n, req.stream) == (None, 1, False)
    assert req.stop_strings() == []
    assert parse_completion(completion(max_tokens=None)).max_tokens == 16


def test_text_parts_are_flattened():
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]
    req = parse_chat(chat(messages=[{"role": "user", "content": parts}]))
    assert messages_for_template(req) == [{"role": "user", "content": "Hello\nworld"}]


def test_developer_becomes_system():
    messages = [{"role": "developer", "content": "Be brief."}, *MESSAGES]
    flat = messages_for_template(parse_chat(chat(messages=messages)))
    assert flat == [{"role": "system", "content": "Be brief."}, *MESSAGES]


def test_tool_conversation_for_template():
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    messages = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
    ]
    flat = messages_for_template(parse_chat(chat(messages=messages)))
    assert flat[1]["content"] == ""
    assert flat[1]["tool_calls"][0]["function"]["arguments"] == {"x": 1}
    assert flat[2] == {"role": "tool", "content": "42", "tool_call_id": "c1"}


@pytest.mark.parametrize(
    "call",
    [
        {"id": "c1", "type": "function", "function": None},
        {"id": "c1", "type": "function", "function": "f"},
        {"id": "c1", "type": "function", "function": {"arguments": "{}"}},
        {"id": "c1", "type": "function", "function": {"name": "f"}},
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": 3}},
        {"bad": 1},
    ],
)
def test_malformed_tool_calls_are_refused(call):
    messages = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [call]}]
    with pytest.raises(APIError) as info:
        parse_chat(chat(messages=messages))
    assert info.value.status == 400 and info.value.param == "messages.1.tool_calls"


def test_max_completion_tokens_wins():
    req = parse_chat(chat(max_tokens=100, max_completion_tokens=7))
    assert req.sampling_kwargs()["max_tokens"] == 7
    assert parse_chat(chat(max_tokens=100)).sampling_kwargs()["max_tokens"] == 100


def test_unknown_fields_are_tolerated():
    body = chat(priority=1, metadata={"a": "b"}, store=False)
    body["messages"] = [{"role": "user", "content": "hi", "cache_control": {}}]
    assert parse_chat(body).messages[0].text() == "hi"
    assert parse_completion(completion(foo=[1, 2])).prompt == "Once upon a time"


def test_tool_fields_are_kept():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    req = parse_chat(
        chat(
            tools=tools,
            tool_choice="auto",
            response_format={"type": "json_object"},
            parallel_tool_calls=False,
        )
    )
    assert req.tools == tools
    assert req.tool_choice == "auto"
    assert req.response_format == {"type": "json_object"}
    assert req.parallel_tool_calls is False


def test_vllm_extras_reach_sampling_kwargs():
    extras = {
        "ignore_eos": True,
        "min_tokens": 3,
        "top_k": 40,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
        "stop_token_ids": [7],
    }
    for req in (parse_chat(chat(**extras)), parse_completion(completion(**extras))):
        kwargs = req.sampling_kwargs()
        assert {key: kwargs[key] for key in extras} == extras


@pytest.mark.parametrize("top_k", [-1, 0])
def test_top_k_disabled(top_k):
    assert parse_chat(chat(top_k=top_k)).sampling_kwargs()["top_k"] == top_k


def test_logit_bias_keys_become_ints():
    kwargs = parse_chat(chat(logit_bias={"50256": -100, "7": 2.5})).sampling_kwargs()
    assert kwargs["logit_bias"] == {50256: -100.0, 7: 2.5}


def test_chat_logprobs():
    assert parse_chat(chat(logprobs=True)).sampling_kwargs()["logprobs"] == 0
    assert parse_chat(chat(logprobs=True, top_logprobs=5)).sampling_kwargs()["logprobs"] == 5


def test_stop_strings():
    assert parse_chat(chat(stop="\n")).stop_strings() == ["\n"]
    assert parse_chat(chat(stop=["a", "b", "c", "d"])).stop_strings() == ["a", "b", "c", "d"]
    assert parse_completion(completion()).stop_strings() == []


def test_stream_options_with_stream():
    req = parse_chat(chat(stream=True, stream_options={"include_usage": True}))
    assert req.stream_options.include_usage is True


@pytest.mark.parametrize(
    ("prompt", "batch"),
    [
        ("hi", ["hi"]),
        (["a", "b"], ["a", "b"]),
        ([1, 2, 3], [[1, 2, 3]]),
        ([[1, 2], [3]], [[1, 2], [3]]),
    ],
)
def test_prompt_forms(prompt, batch):
    assert parse_completion(completion(prompt=prompt)).prompts() == batch


def test_completion_defaults():
    req = parse_completion(completion())
    kwargs = req.sampling_kwargs()
    assert kwargs["max_tokens"] == 16
    assert kwargs["logprobs"] is None
    assert kwargs["prompt_logprobs"] is None
    assert not req.echo_only


def test_echo_scoring():
    # lm-eval's loglikelihood: echo with logprobs, max_tokens 1 (or 0 for vLLM-style scoring)
    kwargs = parse_completion(completion(echo=True, logprobs=1, max_tokens=1)).sampling_kwargs()
    assert (kwargs["logprobs"], kwargs["prompt_logprobs"], kwargs["max_tokens"]) == (1, 1, 1)
    req = parse_completion(completion(echo=True, logprobs=5, max_tokens=0))
    assert req.echo_only
    assert req.sampling_kwargs()["max_tokens"] == 0  # the prompt alone
    SamplingParams(**req.sampling_kwargs())
    # vLLM's prompt_logprobs, alone or beside an echo that asks fewer or more alternatives
    for fields, want in [
        ({"prompt_logprobs": 3}, 3),
        ({"prompt_logprobs": 0, "echo": True, "logprobs": 2}, 2),
        ({"prompt_logprobs": 4, "echo": True, "logprobs": 2}, 4),
        ({"prompt_logprobs": 4, "logprobs": 2}, 4),
    ]:
        assert parse_completion(completion(**fields)).sampling_kwargs()["prompt_logprobs"] == want


def test_completion_accepts_best_of_equal_to_n_and_empty_suffix():
    req = parse_completion(completion(n=2, best_of=2, suffix=""))
    assert req.sampling_kwargs()["n"] == 2


def test_typical_chat_builds_sampling_params():
    req = parse_chat(
        chat(
            temperature=0.7,
            top_p=0.9,
            n=2,
            max_completion_tokens=64,
            seed=1234,
            stop=["\n\n"],
            presence_penalty=0.5,
            frequency_penalty=0.2,
            logit_bias={"42": 3},
            logprobs=True,
            top_logprobs=3,
            user="alice",
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    params = SamplingParams(**req.sampling_kwargs())
    assert (params.n, params.max_tokens, params.logprobs, params.seed) == (2, 64, 3, 1234)
    assert params.logit_bias == {42: 3.0}
    SamplingParams(**parse_chat(chat()).sampling_kwargs())


def test_typical_completion_builds_sampling_params():
    req = parse_completion(
        completion(
            prompt=["a", "b"],
            max_tokens=32,
            temperature=0,
            logprobs=2,
            echo=True,
            stop="\n",
            seed=-5,
            top_k=-1,
        )
    )
    params = SamplingParams(**req.sampling_kwargs())
    assert (params.max_tokens, params.logprobs, params.prompt_logprobs) == (32, 2, 2)
    assert params.greedy
    assert params.top_k == 0
