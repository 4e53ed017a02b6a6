"""POST /v1/responses (OpenAI's Responses API) through a real `pagoda serve`, driven by the
openai SDK: a response is the chat completion of its conversation, so chat completions with
the same messages and seed are the reference (same prompt tokens, same text, same calls).

Model "m" is a tiny random llama; "think" is the same weights under the qwen3 reasoning parser,
its tokenizer given <think> and </think> (a user text ending in <think> makes the prompt's last
tag open the thinking, which the random model never closes)."""

from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema
import openai
import pytest
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from pagoda.server.errors import APIError
from pagoda.server.response_runs import BackgroundRun
from pagoda.server.response_store import ResponseStore, StoredResponse
from pagoda.server.responses_request import input_messages
from tests.conftest import THINK_START_ID
from tests.serving import Server, engines_stopped
from tests.test_keys import ledger, new_key, wait_for

STATIC = "sk-responses-static"
PRICING = {"input_per_1m": 1000.0, "output_per_1m": 2000.0}
SEED = 11
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["C", "F"]}},
    "required": ["city", "unit"],
}
TOOLS = [  # the Responses API's flat shape
    {"type": "function", "name": "get_time", "parameters": TIME},
    {"type": "function", "name": "get_weather", "description": "Weather", "parameters": WEATHER},
]
CHAT_TOOLS = [
    {"type": "function", "function": {k: v for k, v in t.items() if k != "type"}} for t in TOOLS
]
ORDER = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 999},
        "status": {"enum": ["open", "paid"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 2},
    },
    "required": ["id", "status", "tags"],
}


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('db') / 'keys.db'}"


@pytest.fixture(scope="module")
def server(tiny_models, thinking_model, tmp_path_factory, db):
    catalog = tmp_path_factory.mktemp("catalog") / "models.yaml"
    common = {"kind": "chat", "max_model_len": 1024, "engine": {"dtype": "float32"}}
    entries = [
        {
            "id": "m",
            "source": str(tiny_models["llama"]),
            "capabilities": {"tools": True, "json": True},
            "pricing": PRICING,
            **common,
        },
        {
            "id": "think",
            "source": str(thinking_model),
            "capabilities": {"tools": True, "json": True, "reasoning_parser": "qwen3"},
            **common,
        },
    ]
    catalog.write_text(json.dumps({"models": entries}))  # JSON is YAML
    args = ["--catalog", str(catalog), "--database", db, "--api-key", STATIC]
    srv = Server([*args, "--strict-request-fields"]).wait_ready()
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=STATIC, max_retries=0)


def respond(client, **kwargs):
    body = {"model": "m", "max_output_tokens": 24, "extra_body": {"seed": SEED}, **kwargs}
    return client.responses.create(**body)


def chat(client, messages, **kwargs):
    body = {"model": "m", "messages": messages, "max_tokens": 24, "seed": SEED, **kwargs}
    return client.chat.completions.create(**body)


def post(server, body: dict, key: str = STATIC) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.post(f"{server.url}/v1/responses", json=body, headers=headers, timeout=60)


def test_a_response_is_the_chat_completion_of_its_conversation(server, client):
    """Before: 404 (no route)."""
    items = [
        {"role": "developer", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "input_text", "text": "Hello"}]},
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Hi.", "annotations": []}],
        },
        {"role": "user", "content": "Tell me about the river"},
    ]
    response = respond(
        client, instructions="You are terse.", input=items, metadata={"run": "7"}, user="u1"
    )
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "developer", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "text", "text": "Hello"}]},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Tell me about the river"},
    ]
    reference = chat(client, messages)
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.created_at > 0 and response.model == "m"
    assert response.output_text == reference.choices[0].message.content != ""
    assert response.usage.input_tokens == reference.usage.prompt_tokens
    assert response.usage.output_tokens == reference.usage.completion_tokens == 24
    assert response.usage.total_tokens == response.usage.input_tokens + 24
    assert response.usage.output_tokens_details.reasoning_tokens == 0
    assert response.usage.input_tokens_details.cached_tokens >= 0
    (message,) = response.output
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_") and message.content[0].type == "output_text"
    # cut by max_output_tokens, as chat's finish_reason "length"
    assert reference.choices[0].finish_reason == "length"
    assert response.status == "incomplete" and message.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.instructions == "You are terse." and response.metadata == {"run": "7"}
    assert response.user == "u1" and response.max_output_tokens == 24
    assert response.tools == [] and response.tool_choice == "auto"
    assert response.parallel_tool_calls is True and response.text.format.type == "text"


def test_json_schema_format_is_enforced_as_chats_response_format(client):
    text = {"format": {"type": "json_schema", "name": "order", "schema": ORDER, "strict": True}}
    response = respond(client, input="An order", text=text, max_output_tokens=200)
    jsonschema.validate(json.loads(response.output_text), ORDER)
    assert response.status == "completed" and response.incomplete_details is None
    assert response.output[0].status == "completed"
    assert response.completed_at >= response.created_at
    assert response.text.format.type == "json_schema" and response.text.format.name == "order"
    reference = chat(
        client,
        [{"role": "user", "content": "An order"}],
        max_tokens=200,
        response_format={"type": "json_schema", "json_schema": {"name": "order", "schema": ORDER}},
    )
    assert response.output_text == reference.choices[0].message.content

    obj = respond(client, input="An object", text={"format": {"type": "json_object"}})
    assert obj.status == "incomplete" or isinstance(json.loads(obj.output_text), dict)


class Pet(BaseModel):
    name: str = Field(max_length=8)
    legs: int = Field(ge=0, le=8)


def test_sdk_parse_and_stream_with_a_pydantic_format(client):
    parsed = client.responses.parse(
        model="m", input="A pet", text_format=Pet, max_output_tokens=100
    )
    assert isinstance(parsed.output_parsed, Pet)
    with client.responses.stream(
        model="m", input="A pet", text_format=Pet, max_output_tokens=100
    ) as stream:
        final = stream.get_final_response()
    assert isinstance(final.output_parsed, Pet)


def _calls(response) -> list[tuple[str, str]]:
    return [(item.name, item.arguments) for item in response.output if item.type == "function_call"]


@pytest.mark.parametrize(
    ("tool_choice", "chat_choice"),
    [
        ("required", "required"),
        (
            {"type": "function", "name": "get_weather"},
            {"type": "function", "function": {"name": "get_weather"}},
        ),
    ],
)
def test_function_calls_and_their_round_trip(client, tool_choice, chat_choice):
    question = [{"role": "user", "content": "Weather and time?"}]
    response = respond(client, input=question, tools=TOOLS, tool_choice=tool_choice, **_long())
    reference = chat(client, question, tools=CHAT_TOOLS, tool_choice=chat_choice, max_tokens=200)
    expected = [
        (c.function.name, c.function.arguments) for c in reference.choices[0].message.tool_calls
    ]
    assert _calls(response) == expected and expected
    assert response.status == "completed" and response.output_text == ""
    for item in response.output:
        assert item.call_id.startswith("call_") and item.id.startswith("fc_")
        assert item.status == "completed"
    assert response.tool_choice == tool_choice or response.tool_choice.name == "get_weather"
    assert [t.name for t in response.tools] == ["get_time", "get_weather"]

    # the calls and their results sent back, as an agent loop does
    results = [
        {"type": "function_call_output", "call_id": item.call_id, "output": f"result {i}"}
        for i, item in enumerate(response.output)
    ]
    follow_up = respond(client, input=[*question, *response.output, *results], tools=TOOLS)
    calls = [
        {"id": item.call_id, "type": "function", "function": {"name": n, "arguments": a}}
        for item, (n, a) in zip(response.output, expected)
    ]
    history = [
        *question,
        {"role": "assistant", "content": None, "tool_calls": calls},
        *({"role": "tool", "tool_call_id": r["call_id"], "content": r["output"]} for r in results),
    ]
    again = chat(client, history, tools=CHAT_TOOLS)
    assert follow_up.usage.input_tokens == again.usage.prompt_tokens
    assert follow_up.output_text == again.choices[0].message.content

    # the same through previous_response_id
    chained = respond(client, previous_response_id=response.id, input=results, tools=TOOLS)
    assert chained.usage.input_tokens == again.usage.prompt_tokens
    assert chained.output_text == again.choices[0].message.content


def _long() -> dict:
    return {"max_output_tokens": 200}


def test_stream_events_rebuild_the_response(server, client):
    body = dict(model="m", input="Tell me about the river", max_output_tokens=30)
    whole = respond(client, **{k: v for k, v in body.items() if k != "model"})
    with client.responses.stream(**body, extra_body={"seed": SEED}) as stream:
        events = list(stream)  # get_final_response() wants response.completed, as OpenAI's
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",  # cut by max_output_tokens, as OpenAI's
    ]
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == whole.output_text == events[-1].response.output_text
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    assert events[-1].response.usage.output_tokens == whole.usage.output_tokens

    # a complete one ends with response.completed, which get_final_response reads
    text = {"format": {"type": "json_schema", "name": "order", "schema": ORDER}}
    whole = respond(client, input="An order", text=text, max_output_tokens=200)
    with client.responses.stream(
        model="m", input="An order", text=text, max_output_tokens=200, extra_body={"seed": SEED}
    ) as stream:
        final = stream.get_final_response()
    assert final.status == whole.status == "completed"
    assert final.output_text == whole.output_text

    # on the wire: each event named in `event:`, and no [DONE] after the last
    request = {**body, "stream": True, "seed": SEED}
    headers = {"Authorization": f"Bearer {STATIC}"}
    with httpx.stream(
        "POST", f"{server.url}/v1/responses", json=request, headers=headers, timeout=60
    ) as r:
        lines = [line for line in r.iter_lines() if line and not line.startswith(":")]
    names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    data = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    assert names == [d["type"] for d in data] and len(data) == len(lines) / 2


def test_streamed_function_calls(client):
    tool_choice = {"type": "function", "name": "get_weather"}
    whole = respond(client, input="Weather?", tools=TOOLS, tool_choice=tool_choice, **_long())
    with client.responses.stream(
        model="m",
        input="Weather?",
        tools=TOOLS,
        tool_choice=tool_choice,
        max_output_tokens=200,
        extra_body={"seed": SEED},
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    arguments = "".join(
        e.delta for e in events if e.type == "response.function_call_arguments.delta"
    )
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert arguments == done.arguments == whole.output[0].arguments
    assert _calls(final) == _calls(whole)
    assert events[-1].type == "response.completed"

    required = dict(input="Weather and time?", tools=TOOLS, tool_choice="required", **_long())
    whole = respond(client, **required)
    with client.responses.stream(model="m", **required, extra_body={"seed": SEED}) as stream:
        final = stream.get_final_response()
    assert _calls(final) == _calls(whole) and len(_calls(whole)) >= 1


def test_previous_response_id_store_and_get(server, client):
    first = respond(client, instructions="Be terse.", input="Tell me about the river")
    second = respond(client, previous_response_id=first.id, input="And the fox?")
    assert second.previous_response_id == first.id
    # the instructions are not carried over; the earlier output is
    history = [
        {"role": "user", "content": "Tell me about the river"},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "And the fox?"},
    ]
    reference = chat(client, history)
    assert second.usage.input_tokens == reference.usage.prompt_tokens
    assert second.output_text == reference.choices[0].message.content

    got = client.responses.retrieve(second.id)
    assert got.model_dump() == second.model_dump()
    streamed = client.responses.create(
        model="m", input="Hi", max_output_tokens=5, stream=True, extra_body={"seed": SEED}
    )
    last = list(streamed)[-1].response
    assert client.responses.retrieve(last.id).output_text == last.output_text

    unstored = respond(client, input="Hi", store=False)
    for refused in (
        lambda: client.responses.retrieve(unstored.id),
        lambda: respond(client, input="Hi", previous_response_id=unstored.id),
        lambda: client.responses.retrieve("resp_unknown"),
    ):
        with pytest.raises(openai.NotFoundError) as caught:
            refused()
        assert caught.value.body["type"] == "not_found_error"
    assert unstored.model_dump()["store"] is False
    r = post(server, {"model": "m", "input": "Hi", "previous_response_id": "resp_x"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "previous_response_id"

    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)


def test_reasoning_items(client):
    """The thinking becomes a reasoning item (a prompt ending in <think> opens it; the random
    model never closes it), counted in reasoning_tokens; sent back, it reaches the template as
    chat's reasoning does."""
    question = [{"role": "user", "content": "think first <think>"}]
    response = respond(client, model="think", input=question)
    reference = chat(client, question, model="think")
    (item,) = response.output
    assert item.type == "reasoning" and item.id.startswith("rs_")
    assert item.content[0].text == reference.choices[0].message.model_dump()["reasoning"]
    assert response.output_text == "" and response.status == "incomplete"
    assert response.usage.output_tokens_details.reasoning_tokens == 24

    with client.responses.stream(
        model="think", input=question, max_output_tokens=24, extra_body={"seed": SEED}
    ) as stream:
        events = list(stream)
    thought = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert thought == item.content[0].text
    assert events[-1].response.output[0].content[0].text == thought

    answer = {"role": "assistant", "content": "ok"}
    sent_back = input_messages([*question, item.model_dump(), answer])
    assert sent_back[1] == {**answer, "reasoning": item.content[0].text}


BAD = [
    ({"tools": [{"type": "web_search"}]}, "tools.0.type", "'web_search'"),
    (
        {"tools": [{"type": "file_search", "vector_store_ids": ["v"]}]},
        "tools.0.type",
        "file_search",
    ),
    ({"tools": [{"type": "function", "name": "a b"}]}, "tools.0.name", ""),
    (
        {"tools": [{"type": "function", "name": "f", "parameters": {"type": "integer"}}]},
        "tools.0.parameters",
        "object",
    ),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice", ""),
    ({"tools": TOOLS, "tool_choice": {"type": "web_search_preview"}}, "tool_choice", ""),
    ({"tool_choice": "required"}, "tool_choice", "tools"),
    ({"text": {"format": {"type": "xml"}}}, "text.format.type", ""),
    ({"text": {"format": {"type": "json_schema", "schema": ORDER}}}, "text.format.name", ""),
    (
        {"text": {"format": {"type": "json_schema", "name": "x", "schema": {"allOf": [{}]}}}},
        "text.format.schema",
        "allOf",
    ),
    (
        {
            "tools": TOOLS,
            "tool_choice": "required",
            "text": {"format": {"type": "json_object"}},
        },
        "tool_choice, text.format",
        "one structured output constraint",
    ),
    ({"input": []}, "input", ""),
    ({"input": [{"type": "computer_call", "id": "c"}]}, "input.0.type", "computer_call"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.0.type", "item_reference"),
    (
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
        "input.0.content.0.type",
        "input_image",
    ),
    ({"input": [{"role": "tool", "content": "x"}]}, "input.0.role", ""),
    ({"input": [{"content": "x"}]}, "input.0.type", "needs a type"),
    ({"input": [{"type": "function_call", "name": "f"}]}, "input.0.call_id", ""),
    ({"background": True, "store": False}, "background", "store"),
    ({"conversation": "conv_1"}, "conversation", "Conversations"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt", ""),
    ({"include": ["reasoning.encrypted_content", "everything"]}, "include", "'everything'"),
    ({"top_logprobs": 21, "include": ["message.output_text.logprobs"]}, "top_logprobs", ""),
    ({"truncation": "auto"}, "truncation", "auto"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", "16"),
    ({"max_output_tokens": 0}, "max_output_tokens", ""),
    ({"temperature": 3}, "temperature", ""),
    ({"n": 2}, "n", "Unrecognized"),  # --strict-request-fields
]


@pytest.mark.parametrize(("extra", "param", "words"), BAD)
def test_bad_input_is_an_openai_400_naming_the_param(server, extra, param, words):
    for stream in (False, True):
        r = post(server, {"model": "m", "input": "Hi", "stream": stream, **extra})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param
        assert words in error["message"]


def test_unknown_model_and_context_length(server):
    r = post(server, {"model": "nope", "input": "Hi"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = post(server, {"model": "m", "input": "word " * 2000})
    error = r.json()["error"]
    assert r.status_code == 400 and error["code"] == "context_length_exceeded"
    assert error["param"] == "input" and "in the input" in error["message"]


def test_keys_meter_bill_and_scope_responses(server, db):
    name, key = new_key(db, max_concurrent=1)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
    made = respond(client, input="Tell me about the river", max_output_tokens=3)
    # the key's slot is free once the last event is read: the next request is not refused
    for _ in range(4):
        with client.responses.stream(model="m", input="Hi", max_output_tokens=2) as stream:
            assert list(stream)[-1].response.usage.output_tokens == 2
        assert respond(client, input="Hi", max_output_tokens=1).usage.output_tokens == 1
    rows = wait_for(lambda: (rows := ledger(db, name)) and len(rows) == 9 and rows)
    assert {row["endpoint"] for row in rows} == {"/v1/responses"}
    assert (rows[0]["input_tokens"], rows[0]["output_tokens"]) == (
        made.usage.input_tokens,
        made.usage.output_tokens,
    )
    assert rows[0]["cost_usd"] == pytest.approx(
        made.usage.input_tokens * 0.001 + made.usage.output_tokens * 0.002
    )
    # another key sees none of this key's responses
    _, other = new_key(db)
    stranger = openai.OpenAI(base_url=f"{server.url}/v1", api_key=other, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        stranger.responses.retrieve(made.id)
    with pytest.raises(openai.NotFoundError):
        respond(stranger, input="Hi", previous_response_id=made.id)
    assert client.responses.retrieve(made.id).id == made.id


class GetWeather(BaseModel):
    """Weather in a city."""

    city: str = Field(max_length=8)


def test_langchain_use_responses_api(server):
    """LangChain's ChatOpenAI(use_responses_api=True): tools, a tool round trip, structured
    output, streaming."""

    def llm(max_tokens: int) -> ChatOpenAI:
        return ChatOpenAI(
            model="m",
            base_url=f"{server.url}/v1",
            api_key=STATIC,
            use_responses_api=True,
            max_tokens=max_tokens,
            max_retries=0,
        )

    bound = llm(100).bind_tools([GetWeather], tool_choice="GetWeather", parallel_tool_calls=False)
    messages = [HumanMessage("Weather in Paris?")]
    asked = bound.invoke(messages)
    [call] = asked.tool_calls
    assert call["name"] == "GetWeather"
    GetWeather(**call["args"])
    messages += [asked, ToolMessage("Sunny", tool_call_id=call["id"])]
    answer = llm(6).invoke(messages)
    assert answer.text and answer.usage_metadata["output_tokens"] == 6
    chunks = list(llm(6).stream("Tell me about the river"))
    streamed = sum(chunks[1:], chunks[0])
    assert streamed.text and streamed.usage_metadata["output_tokens"] == 6
    pet = llm(100).with_structured_output(Pet, method="json_schema").invoke("A pet")
    assert isinstance(pet, Pet)


# a grammar (vLLM's guided_grammar) makes the tiny model write what a tool-calling model would
HERMES_ANSWER = (
    'Let me check.\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
)


def test_calls_the_model_chose_follow_its_text(client):
    """tool_choice auto: the parser's text and calls, a message item then a function_call
    item, streamed in that order; sent back, they are one assistant turn, as in chat."""
    grammar = {"seed": SEED, "guided_grammar": f"root ::= {json.dumps(HERMES_ANSWER)}"}
    kwargs = dict(input="Time?", tools=TOOLS, max_output_tokens=200, extra_body=grammar)
    response = respond(client, **kwargs)
    message, call = response.output
    assert message.type == "message" and response.output_text == "Let me check."
    assert (call.type, call.name, json.loads(call.arguments)) == (
        "function_call",
        "get_time",
        {"zone": "CET"},
    )
    with client.responses.stream(model="m", **kwargs) as stream:
        kinds = [(e.type, getattr(e, "item", None)) for e in stream]
        final = stream.get_final_response()
    added = [item.type for kind, item in kinds if kind == "response.output_item.added"]
    assert added == ["message", "function_call"]
    assert [item.type for item in final.output] == ["message", "function_call"]
    assert final.output_text == "Let me check." and final.output[1].arguments == call.arguments

    result = {"type": "function_call_output", "call_id": call.call_id, "output": "12:00"}
    follow_up = respond(client, input=[*response.output, result], tools=TOOLS)
    history = [
        {"role": "assistant", "content": "Let me check.", "tool_calls": [_chat_call(call)]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "12:00"},
    ]
    reference = chat(client, history, tools=CHAT_TOOLS)
    assert follow_up.usage.input_tokens == reference.usage.prompt_tokens


def _chat_call(item) -> dict:
    return {
        "id": item.call_id,
        "type": "function",
        "function": {"name": item.name, "arguments": item.arguments},
    }


THOUGHT = "<think>[a-z]{3,8}</think>\n\n[a-z]{3,8}"


def test_thinking_then_answer(client):
    extra = {"seed": SEED, "guided_regex": THOUGHT, "logit_bias": {str(THINK_START_ID): -100}}
    kwargs = dict(model="think", input="think first", max_output_tokens=40, extra_body=extra)
    response = client.responses.create(**kwargs)
    reference = (
        chat(
            client,
            [{"role": "user", "content": "think first"}],
            model="think",
            max_tokens=40,
            logit_bias={str(THINK_START_ID): -100},
            extra_body={"guided_regex": THOUGHT},
        )
        .choices[0]
        .message.model_dump()
    )
    reasoning, message = response.output
    assert reasoning.type == "reasoning" and message.type == "message"
    assert reasoning.content[0].text == reference["reasoning"]
    assert response.output_text == reference["content"]
    assert response.status == "completed"
    assert 0 < response.usage.output_tokens_details.reasoning_tokens < response.usage.output_tokens
    with client.responses.stream(**kwargs) as stream:
        events = list(stream)
    order = [e.type for e in events if e.type.endswith(".delta")]
    assert order == sorted(
        order, key=["response.reasoning_text.delta", "response.output_text.delta"].index
    )
    assert stream.get_final_response().output_text == response.output_text


def test_output_text_logprobs_are_chats(client):
    """include message.output_text.logprobs gives the message's tokens the entries chat's
    logprobs gives them (same seed, same tokens), top_logprobs alternatives each; streamed,
    each text delta carries its tokens' and the done event all of them. Before: a 400."""
    include = ["message.output_text.logprobs"]
    response = respond(client, input="Tell me about the river", include=include, top_logprobs=3)
    reference = chat(
        client,
        [{"role": "user", "content": "Tell me about the river"}],
        logprobs=True,
        top_logprobs=3,
    )
    part = response.output[0].content[0]
    expected = [entry.model_dump() for entry in reference.choices[0].logprobs.content]
    assert [entry.model_dump() for entry in part.logprobs] == expected
    assert len(expected) == 24 and all(len(e["top_logprobs"]) == 3 for e in expected)
    assert "".join(entry.token for entry in part.logprobs) == response.output_text
    assert response.top_logprobs == 3

    body = dict(model="m", input="Tell me about the river", max_output_tokens=24, top_logprobs=3)
    with client.responses.stream(**body, include=include, extra_body={"seed": SEED}) as stream:
        events = list(stream)
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    streamed = [entry.model_dump() for e in deltas for entry in e.logprobs]
    (done,) = [e for e in events if e.type == "response.output_text.done"]
    assert streamed == expected
    assert [entry.model_dump() for entry in done.logprobs] == streamed
    assert events[-1].response.output[0].content[0].model_dump()["logprobs"] == expected

    # top_logprobs says how many alternatives; without the include entry, none is given
    plain = respond(client, input="Tell me about the river", top_logprobs=3)
    assert plain.output_text == response.output_text and plain.output[0].content[0].logprobs == []

    # a forced call's tokens are the call's: no message, no logprobs
    called = respond(
        client, input="Hi", tools=TOOLS, tool_choice="required", include=include, **_long()
    )
    assert {item.type for item in called.output} == {"function_call"}


def test_thinkings_tokens_have_no_logprobs(client):
    """Only the message text's tokens carry logprobs (OpenAI's output_text.logprobs): the
    thinking's are left out, so the entries are the tail of chat's for the same output. Before
    this change: a 400."""
    extra = {"seed": SEED, "guided_regex": THOUGHT, "logit_bias": {str(THINK_START_ID): -100}}
    response = client.responses.create(
        model="think",
        input="think first",
        max_output_tokens=40,
        include=["message.output_text.logprobs"],
        extra_body=extra,
    )
    reference = chat(
        client,
        [{"role": "user", "content": "think first"}],
        model="think",
        max_tokens=40,
        logprobs=True,
        logit_bias={str(THINK_START_ID): -100},
        extra_body={"guided_regex": THOUGHT},
    )
    everything = [entry.model_dump() for entry in reference.choices[0].logprobs.content]
    given = [entry.model_dump() for entry in response.output[1].content[0].logprobs]
    assert 0 < len(given) < len(everything) and given == everything[-len(given) :]
    # the closing tag's tokens wait for the text after it; the EOS ends the message
    assert "".join(entry["token"] for entry in given) == f"</think>{response.output_text}</s>"


def test_an_empty_tools_list_is_no_tools(client):
    """OpenAI's Responses API takes `tools: []` (the Agents SDK sends it for an agent without
    tools); chat's refuses it, as OpenAI's chat does."""
    response = respond(client, input="Hi", tools=[], max_output_tokens=4)
    reference = chat(client, [{"role": "user", "content": "Hi"}], max_tokens=4)
    assert response.output_text == reference.choices[0].message.content
    assert response.tools == []


def test_include_entries_with_nothing_to_add_are_accepted(client):
    """The Agents SDK sends include (reasoning.encrypted_content for stateless turns): the
    reasoning item's content is sent in plain, and hosted tools' and images' entries concern
    items that cannot occur here."""
    include = ["reasoning.encrypted_content", "file_search_call.results"]
    response = respond(client, input="Hi", include=include, max_output_tokens=4)
    assert response.usage.output_tokens == 4


def test_the_store_keeps_its_bound_and_each_keys_own():
    store = ResponseStore(capacity=2)
    for i, owner in enumerate((1, 1, 2)):
        store.put(StoredResponse({"id": f"resp_{i}"}, [], owner))
    with pytest.raises(APIError) as caught:  # the oldest went first
        store.get("resp_0", 1)
    assert caught.value.status == 404
    assert store.get("resp_1", 1).owner == 1
    with pytest.raises(APIError):  # another key's is not told apart from an unknown one
        store.get("resp_2", 1, param="previous_response_id")
    store.delete("resp_2", 2)
    with pytest.raises(APIError):
        store.get("resp_2", 2)
    assert not ResponseStore(capacity=0).enabled


def test_a_background_response_is_not_evicted_while_it_runs():
    """Before: a full store dropped the oldest response even while it ran, and its client
    could no longer read, follow or cancel it."""

    async def scenario() -> None:
        release = asyncio.Event()

        async def events():
            yield {"type": "response.created"}
            await release.wait()

        store = ResponseStore(capacity=2)
        run = BackgroundRun(events(), on_cancel=lambda: None)
        store.put(StoredResponse({"id": "resp_running"}, [], None, run=run))
        for i in range(3):
            store.put(StoredResponse({"id": f"resp_{i}"}, [], None))
        assert store.get("resp_running", None).run is run  # the oldest, kept
        assert store.get("resp_2", None)
        for evicted in ("resp_0", "resp_1"):  # the oldest that had ended went instead
            with pytest.raises(APIError):
                store.get(evicted, None)
        release.set()
        await run.wait()
        store.put(StoredResponse({"id": "resp_3"}, [], None))  # ended: the oldest goes now
        with pytest.raises(APIError):
            store.get("resp_running", None)
        assert store.get("resp_3", None) and store.get("resp_2", None)

    asyncio.run(scenario())


def engine_pid(server: Server, model: str = "m") -> int:
    return httpx.get(f"{server.url}/health").json()["models"][model]["pid"]


def get(server: Server, path: str, **params) -> httpx.Response:
    headers = {"Authorization": f"Bearer {STATIC}"}
    return httpx.get(f"{server.url}/v1/responses/{path}", params=params, headers=headers)


def test_input_items_list_the_requests_input(server, client):
    """GET /v1/responses/{id}/input_items (the SDK's responses.input_items.list): the request's
    input items, each with an id (its own kept), newest first unless order=asc, in pages of
    `limit` after or before an item. Before: 404."""
    items = [
        {"role": "developer", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "input_text", "text": "Hello"}]},
        {"id": "msg_mine", "type": "message", "role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Tell me about the river"},
    ]
    response = respond(client, input=items, max_output_tokens=2)
    listed = client.responses.input_items.list(response.id)
    assert [item.role for item in listed.data] == ["user", "assistant", "user", "developer"]
    assert listed.data[1].id == "msg_mine" and not listed.has_more
    assert len({item.id for item in listed.data}) == 4
    assert listed.data[0].content[0].type == "input_text"
    assert listed.data[0].content[0].text == "Tell me about the river"
    assert listed.data[1].content[0].type == "output_text"
    assert {item.status for item in listed.data} == {"completed"}

    ascending = [item.id for item in listed.data][::-1]
    page = client.responses.input_items.list(response.id, order="asc", limit=3)
    assert [item.id for item in page.data] == ascending[:3] and page.has_more
    assert (page.first_id, page.last_id) == (ascending[0], ascending[2])
    # the SDK follows the pages through `after`
    every = client.responses.input_items.list(response.id, order="asc", limit=1)
    assert [item.id for item in every] == ascending
    before = get(server, f"{response.id}/input_items", order="asc", before=ascending[2]).json()
    assert [item["id"] for item in before["data"]] == ascending[:2]

    # a string input is one user message; previous_response_id's items are not this one's
    follow_up = respond(client, input="And then?", previous_response_id=response.id)
    (only,) = client.responses.input_items.list(follow_up.id).data
    assert only.role == "user" and only.content[0].text == "And then?"

    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list("resp_unknown")
    for params, param in [
        ({"limit": 0}, "limit"),
        ({"limit": 101}, "limit"),
        ({"order": "sideways"}, "order"),
        ({"after": "msg_unknown"}, "after"),
    ]:
        r = get(server, f"{response.id}/input_items", **params)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_background_response_is_queued_then_polled(server, client):
    """background: true answers at once (status queued); the response is made meanwhile and
    GET returns it as it is, then complete: the same output as the same request in the
    foreground. Before: a 400."""
    foreground = respond(client, input="Tell me about the river", max_output_tokens=40)
    queued = respond(client, input="Tell me about the river", max_output_tokens=40, background=True)
    assert queued.status == "queued" and queued.background and queued.output == []
    done = wait_for(
        lambda: (
            (r := client.responses.retrieve(queued.id)).status not in ("queued", "in_progress")
            and r
        )
    )
    assert done.status == foreground.status == "incomplete" and done.background
    assert done.output_text == foreground.output_text != ""
    assert done.usage.output_tokens == foreground.usage.output_tokens == 40

    # a follow-up continues it, as any stored response
    follow_up = respond(client, input="And then?", previous_response_id=queued.id)
    assert follow_up.usage.input_tokens > done.usage.input_tokens + 40

    # a completed one cannot be cancelled; a foreground one never
    for made in (done, foreground):
        with pytest.raises(openai.BadRequestError):
            client.responses.cancel(made.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.cancel("resp_unknown")


def test_background_stream_outlives_its_client_and_resumes(server, client):
    """A background stream goes on when its client leaves; GET ?stream=true&starting_after=N
    (the SDK's retrieve(stream=True)) sends the events numbered above N, then follows them to
    the end. Stitched together they are the response's whole stream."""
    body = dict(model="m", input="Tell me about the river", max_output_tokens=40)
    with client.responses.stream(**body, extra_body={"seed": SEED}) as stream:
        foreground = list(stream)
    first = []
    with client.responses.create(
        **body, background=True, stream=True, extra_body={"seed": SEED}
    ) as events:
        for event in events:
            first.append(event)
            if event.type == "response.output_text.delta":
                break  # the client leaves mid-output
    response_id = first[0].response.id
    assert [e.type for e in first[:3]] == [
        "response.created",
        "response.queued",
        "response.in_progress",
    ]
    assert first[0].response.status == "queued" and first[0].response.background
    rest = list(client.responses.retrieve(response_id, stream=True, starting_after=len(first) - 1))
    stitched = first + rest
    assert [e.sequence_number for e in stitched] == list(range(len(stitched)))
    deltas = "".join(e.delta for e in stitched if e.type == "response.output_text.delta")
    expected = "".join(e.delta for e in foreground if e.type == "response.output_text.delta")
    assert deltas == expected != ""
    assert stitched[-1].type == "response.incomplete"
    assert stitched[-1].response.output_text == expected
    # from the start, once it has ended: the same events again
    again = list(client.responses.retrieve(response_id, stream=True))
    assert [e.model_dump() for e in again] == [e.model_dump() for e in stitched]

    made = respond(client, input="Hi", max_output_tokens=2)
    for params, param in [
        ({"stream": "true"}, "stream"),
        ({"starting_after": -2}, "starting_after"),
    ]:
        r = get(server, made.id, **params)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_cancel_a_background_response(server, client):
    """POST /v1/responses/{id}/cancel ends a background response where it is (its engine
    request aborted): status cancelled, kept; cancelling again returns it. DELETE of a running
    one cancels it too."""
    with engines_stopped([engine_pid(server)]):  # nothing runs: it is still queued
        queued = respond(client, input="Hi", max_output_tokens=500, background=True)
        # its output is not there to be continued yet
        with pytest.raises(openai.BadRequestError, match="still being made"):
            respond(client, input="And then?", previous_response_id=queued.id)
        cancelled = client.responses.cancel(queued.id)
        assert cancelled.status == "cancelled" and cancelled.usage.output_tokens == 0
        assert client.responses.retrieve(queued.id).status == "cancelled"
        assert client.responses.cancel(queued.id).status == "cancelled"
        doomed = respond(client, input="Hi", max_output_tokens=500, background=True)
        client.responses.delete(doomed.id)
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(doomed.id)
    wait_for(lambda: server.running("m") == 0)

    # under way: it stops short of its max_output_tokens
    running = respond(client, input="Hi", max_output_tokens=900, background=True)
    wait_for(lambda: client.responses.retrieve(running.id).output_text)
    cancelled = client.responses.cancel(running.id)
    assert cancelled.status == "cancelled" and 0 < cancelled.usage.output_tokens < 900
    assert cancelled.output_text.startswith(client.responses.retrieve(running.id).output_text)
    wait_for(lambda: server.running("m") == 0)


def test_a_background_response_holds_its_keys_slot_and_is_billed_whole(server, db):
    """A key's concurrency counts a background response until it ends (not only until its
    answer, which comes at once), and the ledger bills all of its output."""
    name, key = new_key(db, max_concurrent=1)
    # a request let through would wait for the stopped engine: fail in seconds, not minutes
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=20)
    with engines_stopped([engine_pid(server)]):
        queued = respond(client, input="Hi", max_output_tokens=30, background=True)
        with pytest.raises(openai.RateLimitError):
            respond(client, input="Hi", max_output_tokens=1)
    done = wait_for(
        lambda: (r := client.responses.retrieve(queued.id)).status == "incomplete" and r
    )
    assert respond(client, input="Hi", max_output_tokens=1).usage.output_tokens == 1
    rows = wait_for(lambda: (rows := ledger(db, name)) and len(rows) >= 2 and rows)
    assert rows[0]["output_tokens"] == done.usage.output_tokens == 30
