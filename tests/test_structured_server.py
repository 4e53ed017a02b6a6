"""Tool calling and structured outputs through a real `pagoda serve` with a tiny random model,
driven by the openai SDK and LangChain. The model's free output is gibberish, so every valid
result here comes from the grammar."""

from __future__ import annotations

import json
import re
from enum import Enum
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from tests.serving import Server

MODEL = "test-org/tiny-llama"
MESSAGES = [{"role": "user", "content": "Tell me about a person"}]

ORDER = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 9999},
        "status": {"enum": ["open", "paid", "shipped"]},
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{2}$"},
                    "qty": {"type": "integer", "minimum": 1, "maximum": 9},
                },
                "required": ["sku", "qty"],
            },
        },
        "customer": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 10}, "vip": {"type": "boolean"}},
            "required": ["name", "vip"],
        },
    },
    "required": ["id", "status", "items", "customer"],
}
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}


class Color(str, Enum):
    red = "red"
    blue = "blue"


class Pet(BaseModel):
    name: str = Field(max_length=8)
    legs: int = Field(ge=0, le=8)
    color: Color


@pytest.fixture(scope="module")
def server(tiny_models):
    args = ["--model", str(tiny_models["llama"]), "--served-model-name", MODEL]
    srv = Server([*args, "--max-model-len", "1024"]).wait_ready()
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


def chat(client, **kwargs):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 200, "seed": 7, **kwargs}
    return client.chat.completions.create(**body)


def response_format(schema: dict) -> dict:
    return {
        "type": "json_schema",
        "json_schema": {"name": "order", "schema": schema, "strict": True},
    }


def test_json_schema_nested_arrays_enums_n2(client):
    out = chat(client, response_format=response_format(ORDER), n=2, temperature=0.8)
    assert len(out.choices) == 2
    for choice in out.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), ORDER)
    assert out.choices[0].message.content != out.choices[1].message.content


def test_json_object(client):
    out = chat(client, response_format={"type": "json_object"}, max_tokens=60, temperature=0)
    choice = out.choices[0]
    assert choice.message.content.startswith("{")
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)


def test_stop_strings_do_not_cut_a_grammar(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    out = chat(client, tools=TOOLS, tool_choice=named, stop=[","], temperature=0)
    _check_calls(out.choices[0], ["get_weather"])
    out = chat(client, response_format=response_format(WEATHER), stop=[","], temperature=0)
    assert out.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(out.choices[0].message.content), WEATHER)
    text = client.completions.create(
        model=MODEL,
        prompt="Weather",
        max_tokens=200,
        stop=[","],
        extra_body={"guided_json": WEATHER},
    )
    jsonschema.validate(json.loads(text.choices[0].text), WEATHER)
    plain = chat(client, max_tokens=40, temperature=0).choices[0].message.content
    cut = chat(client, max_tokens=40, temperature=0, stop=[plain[5:8]])
    assert cut.choices[0].message.content == plain[: plain.index(plain[5:8])]  # unconstrained


def test_text_format_is_unconstrained(client):
    plain = chat(client, max_tokens=20, temperature=0).choices[0].message.content
    text = chat(client, max_tokens=20, temperature=0, response_format={"type": "text"})
    assert text.choices[0].message.content == plain


def test_sdk_parse_and_stream_helpers_with_pydantic(client):
    parsed = client.chat.completions.parse(
        model=MODEL, messages=MESSAGES, response_format=Pet, max_tokens=100, seed=1
    )
    assert isinstance(parsed.choices[0].message.parsed, Pet)
    beta = client.beta.chat.completions.parse(
        model=MODEL, messages=MESSAGES, response_format=Pet, max_tokens=100, seed=3
    )
    assert isinstance(beta.choices[0].message.parsed, Pet)
    with client.chat.completions.stream(
        model=MODEL, messages=MESSAGES, response_format=Pet, max_tokens=100, seed=2
    ) as stream:
        kinds = {event.type for event in stream}
        final = stream.get_final_completion()
    assert "content.delta" in kinds
    assert isinstance(final.choices[0].message.parsed, Pet)


def _check_calls(choice, names=None):
    calls = choice.message.tool_calls
    assert calls, choice
    assert choice.message.content is None
    assert choice.finish_reason == "tool_calls"
    for call in calls:
        assert call.id.startswith("call_") and call.type == "function"
        assert names is None or call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    return calls


def test_named_tool_choice(client):
    named = {"type": "function", "function": {"name": "get_time"}}
    out = chat(client, tools=TOOLS, tool_choice=named, temperature=0.7)
    assert [c.function.name for c in _check_calls(out.choices[0])] == ["get_time"]


def test_required_tool_choice_and_parallel_calls(client):
    stopped = 0
    for seed in range(3):
        out = chat(client, tools=TOOLS, tool_choice="required", temperature=1.0, seed=seed, n=2)
        for choice in out.choices:
            if choice.finish_reason == "length":  # a random model may list calls for long
                assert choice.message.content is None
                continue
            _check_calls(choice, SCHEMAS)
            stopped += 1
    assert stopped >= 2
    single = chat(client, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    assert len(_check_calls(single.choices[0])) == 1


def test_required_arguments_keep_their_characters(client):
    city = {"type": "object", "properties": {"city": {"enum": ["Zürich"]}}, "required": ["city"]}
    tool = {"type": "function", "function": {"name": "weather", "parameters": city}}
    kwargs = dict(tools=[tool], parallel_tool_calls=False, max_tokens=100)
    for choice in ("required", {"type": "function", "function": {"name": "weather"}}):
        (call,) = chat(client, **kwargs, tool_choice=choice).choices[0].message.tool_calls
        assert json.loads(call.function.arguments) == {"city": "Zürich"}
        assert "Zürich" in call.function.arguments  # not "Z\\u00fcrich", as named calls


PING = {"type": "function", "function": {"name": "ping"}}
SCHEMAS["ping"] = {"type": "object", "properties": {}, "additionalProperties": False}


def test_required_cut_by_length_gives_its_complete_calls(client):
    kwargs = dict(tools=[PING, *TOOLS], tool_choice="required", temperature=1.0, max_tokens=60)
    cut = 0
    for seed in range(3):
        whole = chat(client, **kwargs, seed=seed).choices[0]
        assert whole.message.content is None  # never the calls array's text
        for call in whole.message.tool_calls or []:
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
        cut += whole.finish_reason == "length" and bool(whole.message.tool_calls)
        content = ""
        for chunk in chat(client, **kwargs, seed=seed, stream=True):
            content += chunk.choices[0].delta.content or ""
        assert content == ""
        calls, finishes = _streamed_calls(client, **kwargs, seed=seed)
        assert finishes == [whole.finish_reason]
        expected = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls or []]
        assert [(c["name"], c["arguments"]) for c in calls.values()] == expected
    assert cut


def test_required_calls_are_capped(client):
    # this model, left alone, lists pings until max_tokens
    out = chat(client, tools=[PING], tool_choice="required", temperature=1.0, max_tokens=700)
    assert out.choices[0].finish_reason == "tool_calls"
    assert len(out.choices[0].message.tool_calls) <= 16


def test_empty_parameters_take_the_empty_object(client):
    for parameters in ({}, None, {"description": "no type"}):
        tool = {"type": "function", "function": {"name": "f", "parameters": parameters}}
        named = {"type": "function", "function": {"name": "f"}}
        for seed in range(2):
            out = chat(client, tools=[tool], tool_choice=named, temperature=1.0, seed=seed)
            assert out.choices[0].message.tool_calls[0].function.arguments == "{}"


class Place(BaseModel):
    city: str = Field(max_length=8)


class Trip(BaseModel):
    start: Place
    days: int = Field(ge=1, le=9)


# another tool whose own "Place" differs, and a bare "#" ref (a recursive tree)
TREE = {
    "type": "object",
    "$defs": {"Place": {"enum": ["here", "there"]}},
    "properties": {
        "at": {"$ref": "#/$defs/Place"},
        "kids": {"type": "array", "items": {"$ref": "#"}, "maxItems": 1},
    },
    "required": ["at", "kids"],
}


def test_required_takes_parameters_with_defs_and_refs(client):
    tools = [
        openai.pydantic_function_tool(Trip),
        {"type": "function", "function": {"name": "tree", "parameters": TREE}},
    ]
    schemas = {"Trip": tools[0]["function"]["parameters"], "tree": TREE}
    assert "$defs" in schemas["Trip"]
    for offered in (tools, tools[1:]):  # both (a clash of names), and the tree alone
        kwargs = dict(tools=offered, tool_choice="required", parallel_tool_calls=False)
        [call] = chat(client, **kwargs, max_tokens=150).choices[0].message.tool_calls
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_none_and_auto_answer_in_the_openai_shape(client):
    out = chat(client, tools=TOOLS, tool_choice="none", max_tokens=30)
    assert out.choices[0].message.tool_calls is None
    assert isinstance(out.choices[0].message.content, str)
    auto = chat(client, tools=TOOLS, max_tokens=30).choices[0]
    assert auto.message.tool_calls is None or auto.finish_reason == "tool_calls"


def test_history_with_tool_calls_and_results(server, client):
    messages = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
    ]
    out = chat(client, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=10)
    assert out.choices[0].finish_reason in ("stop", "length")
    # the template knows no tools: the past call is written into the conversation, also when
    # no tool is offered now (the template alone would drop it, leaving the result orphaned)
    url = server.url
    prompt = httpx.post(f"{url}/tokenize", json={"model": MODEL, "messages": messages}).json()
    text = httpx.post(f"{url}/detokenize", json={"model": MODEL, "tokens": prompt["tokens"]})
    assert '{"name": "get_time", "arguments": {"zone": "UTC"}}' in text.json()["prompt"]
    for extra in ({"tools": TOOLS, "tool_choice": "none"}, {}):
        usage = chat(client, messages=messages, max_tokens=1, **extra).usage
        assert usage.prompt_tokens == prompt["count"]


def _streamed_calls(client, **kwargs) -> tuple[dict[int, dict], list[str]]:
    calls: dict[int, dict] = {}
    finishes = []
    for chunk in chat(client, stream=True, **kwargs):
        for choice in chunk.choices:
            if choice.finish_reason is not None:
                finishes.append(choice.finish_reason)
            indexes = [delta.index for delta in choice.delta.tool_calls or []]
            assert len(set(indexes)) == len(indexes), chunk  # one entry per call per chunk
            for delta in choice.delta.tool_calls or []:
                if delta.index not in calls:  # a call's first delta: id, type, name
                    assert delta.id.startswith("call_") and delta.type == "function"
                    assert delta.function.name and delta.function.arguments is not None
                    calls[delta.index] = {"name": delta.function.name, "arguments": ""}
                    calls[delta.index]["arguments"] += delta.function.arguments
                else:  # then fragments only
                    assert delta.id is None and delta.function.name is None
                    calls[delta.index]["arguments"] += delta.function.arguments
    return calls, finishes


@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}]
)
def test_streamed_calls_reassemble_to_the_non_streamed_ones(client, tool_choice):
    kwargs = dict(tools=TOOLS, tool_choice=tool_choice, temperature=0)
    whole = chat(client, **kwargs).choices[0].message.tool_calls
    calls, finishes = _streamed_calls(client, **kwargs)
    assert finishes == ["tool_calls"]
    assert [c["name"] for c in calls.values()] == [c.function.name for c in whole]
    assert [c["arguments"] for c in calls.values()] == [c.function.arguments for c in whole]


@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "GetWeather"}}]
)
def test_sdk_stream_helper_sees_every_call_done(server, client, tool_choice):
    kwargs = dict(
        model=MODEL,
        messages=MESSAGES,
        tools=[openai.pydantic_function_tool(GetWeather)],
        tool_choice=tool_choice,
        parallel_tool_calls=False,
        max_tokens=100,
    )
    with client.chat.completions.stream(**kwargs) as stream:
        done = [e for e in stream if e.type == "tool_calls.function.arguments.done"]
        final = stream.get_final_completion()
    assert len(done) == 1 and isinstance(done[0].parsed_arguments, GetWeather)
    assert final.choices[0].message.content is None

    # OpenAI's shape: the finish_reason alone in the last chunk, no empty content
    body = {**kwargs, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body) as r:
        lines = [line.removeprefix("data: ") for line in r.iter_lines() if line]
    choices = [json.loads(line)["choices"][0] for line in lines[:-1]]
    assert choices[-1]["delta"] == {} and choices[-1]["finish_reason"] == "tool_calls"
    assert all(c["finish_reason"] is None for c in choices[:-1])
    assert all(c["delta"].get("content") != "" for c in choices)
    assert choices[0]["delta"]["role"] == "assistant"


# a grammar makes the tiny model write what a tool-calling model would (tool_choice auto)
HERMES_ANSWER = (
    'Let me check.\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
)


def test_auto_calls_are_parsed_and_streamed(client):
    grammar = {"guided_grammar": f"root ::= {json.dumps(HERMES_ANSWER)}"}
    kwargs = dict(tools=TOOLS, tool_choice="auto", extra_body=grammar)
    choice = chat(client, **kwargs).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    [call] = choice.message.tool_calls
    assert call.function.name == "get_time"
    assert json.loads(call.function.arguments) == {"zone": "CET"}

    content = ""
    for chunk in chat(client, stream=True, **kwargs):
        content += chunk.choices[0].delta.content or ""
    assert content == "Let me check."
    calls, finishes = _streamed_calls(client, **kwargs)
    assert finishes == ["tool_calls"]
    assert calls == {0: {"name": "get_time", "arguments": call.function.arguments}}

    plain = chat(client, tools=TOOLS, extra_body={"guided_choice": ["No call needed."]})
    assert plain.choices[0].message.content == "No call needed."
    assert plain.choices[0].message.tool_calls is None
    assert plain.choices[0].finish_reason == "stop"


def test_sdk_parse_with_a_strict_pydantic_tool(client):
    out = client.chat.completions.parse(
        model=MODEL,
        messages=MESSAGES,
        tools=[openai.pydantic_function_tool(Pet)],
        tool_choice={"type": "function", "function": {"name": "Pet"}},
        max_tokens=100,
    )
    call = out.choices[0].message.tool_calls[0]
    assert isinstance(call.function.parsed_arguments, Pet)


def test_completions_take_vllm_fields(client):
    def complete(**extra):
        out = client.completions.create(
            model=MODEL, prompt="Numbers like", max_tokens=400, seed=3, extra_body=extra
        )
        assert out.choices[0].finish_reason == "stop"
        return out.choices[0]

    choice = complete(guided_json=WEATHER)
    jsonschema.validate(json.loads(choice.text), WEATHER)
    assert complete(guided_choice=["alpha", "beta"]).text in ("alpha", "beta")
    assert re.fullmatch(r"\d{3}-[a-z]{2}", complete(guided_regex=r"\d{3}-[a-z]{2}").text)
    so = complete(structured_outputs={"json": ORDER})
    jsonschema.validate(json.loads(so.text), ORDER)
    grammar = complete(structured_outputs={"grammar": 'root ::= "a" | "bb"'})
    assert grammar.text in ("a", "bb")


def test_logprobs_of_tokens_the_grammar_rules_out(server):
    """Under a grammar the top alternatives include tokens it rules out, whose logprob is
    -inf; JSON has no infinity, so they come as -9999.0, as OpenAI and vLLM send them (the body
    was a 400, "Out of range float values are not JSON compliant", and a stream carried
    -Infinity, which JSON.parse and other strict parsers refuse)."""
    requests = [
        ("/v1/completions", {"prompt": "Numbers like", "logprobs": 5}),
        ("/v1/chat/completions", {"messages": MESSAGES, "logprobs": True, "top_logprobs": 5}),
    ]
    for path, fields in requests:
        for stream in (False, True):
            body = {"model": MODEL, "max_tokens": 20, "seed": 3, "stream": stream, **fields}
            body["guided_choice"] = ["alpha", "beta"]
            r = httpx.post(f"{server.url}{path}", json=body, timeout=60)
            assert r.status_code == 200, r.text
            assert "Infinity" not in r.text and "NaN" not in r.text, r.text
            # after the choice only the end is allowed: the other four are ruled out
            assert "-9999.0" in r.text


BAD = [
    (
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice",
        "nope",
    ),
    ({"tool_choice": "required"}, "tool_choice", "only allowed when tools"),
    ({"tools": [{"type": "retrieval"}]}, "tools.0.type", "function"),
    (
        {"tools": [{"type": "function", "function": {"description": "x"}}]},
        "tools.0.function.name",
        "",
    ),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools.0.function.name", ""),
    (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
        "tools.0.function.parameters",
        "",
    ),
    (
        {
            "tools": [
                {
                    "type": "function",
                    "function": {"name": "f", "parameters": {"type": "object", "not": {}}},
                }
            ]
        },
        "tools.0.function.parameters",
        "'not'",
    ),
    (
        {
            "tools": [
                {"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}
            ]
        },
        "tools.0.function.parameters",
        "'f'",
    ),
    (
        {
            "tools": [
                {"type": "function", "function": {"name": "f", "parameters": {"type": "integer"}}},
                {"type": "function", "function": {"name": "g", "parameters": {"enum": [1, 2]}}},
            ]
        },
        "tools.0.function.parameters",
        '"type": "object"',
    ),
    (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"enum": [1]}}}]},
        "tools.0.function.parameters",
        "object",
    ),
    ({"tools": "get_weather"}, "tools", ""),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", ""),
    ({"response_format": {"type": "xml"}}, "response_format.type", ""),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", ""),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"schema": ORDER}}},
        "response_format.json_schema.name",
        "",
    ),
    (
        {"response_format": response_format({"type": "array", "uniqueItems": True})},
        "response_format.json_schema.schema",
        "'uniqueItems'",
    ),
    (
        {"response_format": response_format({"type": "object", "allOf": [{}]})},
        "response_format.json_schema.schema",
        "'allOf'",
    ),
    (
        {"response_format": response_format({"type": "string", "pattern": "^(?!test)[a-z]{4}$"})},
        "response_format.json_schema.schema",
        "'pattern'",
    ),
    (
        {
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "parameters": {"properties": {"w": {"type": "string", "pattern": "(?=a)"}}},
                    },
                }
            ]
        },
        "tools.0.function.parameters",
        "Lookahead",
    ),
    (
        {"guided_json": {"$defs": {"N": {"type": "string"}}, "$ref": "#/$defs/N", "maxLength": 3}},
        "guided_json",
        "'maxLength' beside a '$ref'",
    ),
    (
        {"response_format": {"type": "json_object"}, "guided_regex": "[0-9]{3}"},
        "response_format, guided_regex",
        "one structured output constraint",
    ),
    (
        {"response_format": {"type": "json_object"}, "structured_outputs": {"choice": ["a"]}},
        "response_format, structured_outputs",
        "",
    ),
    (
        {
            "tools": TOOLS,
            "tool_choice": {"type": "function", "function": {"name": "get_time"}},
            "response_format": {"type": "json_object"},
        },
        "tool_choice, response_format",
        "",
    ),
    (
        {"tools": TOOLS, "tool_choice": "required", "guided_choice": ["a"]},
        "tool_choice, guided_choice",
        "",
    ),
    ({"guided_regex": "(?<=a)b"}, "guided_regex", "Lookbehind"),
    ({"guided_choice": "yes"}, "guided_choice", "list of strings"),
    ({"guided_grammar": "root ::= nothing"}, "guided_grammar", "not defined"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
    ({"guided_json": {"type": "foo"}}, "guided_json", "foo"),
]


@pytest.mark.parametrize(("extra", "param", "words"), BAD)
def test_bad_input_is_an_openai_400(server, extra, param, words):
    for stream in (False, True):
        body = {"model": MODEL, "messages": MESSAGES, "stream": stream, **extra}
        r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error"
        assert error["param"] == param
        assert words in error["message"]


class GetWeather(BaseModel):
    """Weather in a city."""

    city: str = Field(max_length=10)
    unit: Literal["celsius", "fahrenheit"]


def test_langchain_bind_tools_and_structured_output(server):
    llm = ChatOpenAI(
        model=MODEL, base_url=f"{server.url}/v1", api_key="none", max_tokens=200, temperature=0
    )
    message = llm.bind_tools([GetWeather], tool_choice="GetWeather").invoke("Weather in Paris?")
    assert message.tool_calls, message
    assert message.tool_calls[0]["name"] == "GetWeather"
    GetWeather(**message.tool_calls[0]["args"])
    assert message.response_metadata["finish_reason"] == "tool_calls"

    pet = llm.with_structured_output(Pet).invoke("Describe a pet")
    assert isinstance(pet, Pet)
    by_tool = llm.with_structured_output(Pet, method="function_calling").invoke("A pet")
    assert isinstance(by_tool, Pet)


def test_langchain_streams_tool_calls(server):
    llm = ChatOpenAI(
        model=MODEL, base_url=f"{server.url}/v1", api_key="none", max_tokens=200, temperature=0
    )
    for tool_choice in ("GetWeather", "any"):
        bound = llm.bind_tools([GetWeather], tool_choice=tool_choice, parallel_tool_calls=False)
        chunks = list(bound.stream("Paris?"))
        message = sum(chunks[1:], chunks[0])
        assert not message.invalid_tool_calls, message
        [call] = message.tool_calls
        assert call["name"] == "GetWeather" and call["id"].startswith("call_")
        GetWeather(**call["args"])
    structured = llm.with_structured_output(Pet, method="function_calling")
    assert isinstance(list(structured.stream("A pet"))[-1], Pet)


def test_langchain_agent_round_trip_with_usage_on_streams(server):
    """An agent's loop: a forced call, its ToolMessage result sent back, the answer invoked
    and streamed; with stream_usage (docs/compatibility.md) the stream's usage_metadata has
    the invoke's counts, the prompt now read from the prefix cache."""
    llm = ChatOpenAI(
        model=MODEL,
        base_url=f"{server.url}/v1",
        api_key="none",
        max_tokens=200,
        temperature=0,
        stream_usage=True,
        max_retries=0,
    )
    bound = llm.bind_tools([GetWeather], tool_choice="GetWeather", parallel_tool_calls=False)
    messages = [HumanMessage("Weather in Paris?")]
    asked = bound.invoke(messages)
    [call] = asked.tool_calls
    messages += [asked, ToolMessage("Sunny, 21 C", tool_call_id=call["id"])]
    answerer = llm.bind(max_tokens=12)
    answer = answerer.invoke(messages)
    assert answer.content and not answer.tool_calls
    assert 0 < answer.usage_metadata["output_tokens"] <= 12
    chunks = list(answerer.stream(messages))
    streamed = sum(chunks[1:], chunks[0])
    assert streamed.content == answer.content
    counts = ("input_tokens", "output_tokens", "total_tokens")
    assert [streamed.usage_metadata[k] for k in counts] == [
        answer.usage_metadata[k] for k in counts
    ]
    assert streamed.usage_metadata["input_token_details"]["cache_read"] > 0  # the same prompt


def test_catalog_capabilities_refuse_tools_and_json(tiny_models, tmp_path):
    catalog = tmp_path / "models.yaml"
    catalog.write_text(
        f"models:\n  - id: plain\n    kind: chat\n    source: {tiny_models['qwen2']}\n"
        "    max_model_len: 256\n"
    )
    srv = Server(["--catalog", str(catalog)]).wait_ready()
    try:
        base = {"model": "plain", "messages": MESSAGES, "max_tokens": 5}
        for extra, param in [
            ({"tools": TOOLS}, "tools"),
            ({"response_format": {"type": "json_object"}}, "response_format"),
        ]:
            r = httpx.post(f"{srv.url}/v1/chat/completions", json={**base, **extra}, timeout=30)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
            assert "does not support" in r.json()["error"]["message"]
        # tool_choice none only shows the tools: allowed
        ok = {**base, "tools": TOOLS, "tool_choice": "none"}
        assert httpx.post(f"{srv.url}/v1/chat/completions", json=ok, timeout=30).status_code == 200
    finally:
        assert srv.stop() == 0, srv.log()
