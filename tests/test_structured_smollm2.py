"""Tool calling and structured outputs with the real SmolLM2 of the default catalog, served by a
real `pagoda serve` and driven by the openai SDK and LangChain."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

from tests.serving import Server, default_chat_catalog

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
PARIS_WEATHER = [{"role": "user", "content": "What's the weather in Paris?"}]
CAPITAL = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
    "required": ["city", "country"],
}


class Capital(BaseModel):
    city: str
    country: str


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    catalog = default_chat_catalog(tmp_path_factory.mktemp("catalog"))
    srv = Server(["--catalog", str(catalog)]).wait_ready(300)
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


def chat(client, **kwargs):
    defaults = {"messages": PARIS_WEATHER, "temperature": 0, "max_tokens": 80}
    return client.chat.completions.create(model=MODEL, **{**defaults, **kwargs})


def test_json_schema_answers_correctly(client):
    question = "What is the capital of France? Answer in JSON with city and country."
    format_ = {"type": "json_schema", "json_schema": {"name": "capital", "schema": CAPITAL}}
    out = chat(client, messages=[{"role": "user", "content": question}], response_format=format_)
    choice = out.choices[0]
    assert choice.finish_reason == "stop"
    answer = json.loads(choice.message.content)
    jsonschema.validate(answer, CAPITAL)
    assert answer["city"] == "Paris"


def test_json_schema_sampled_n2(client):
    format_ = {"type": "json_schema", "json_schema": {"name": "capital", "schema": CAPITAL}}
    out = chat(client, response_format=format_, n=2, temperature=1.0, seed=5, max_tokens=200)
    assert len(out.choices) == 2
    for choice in out.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), CAPITAL)


@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}]
)
def test_forced_calls(client, tool_choice):
    choice = chat(client, tools=[WEATHER_TOOL], tool_choice=tool_choice).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


def test_auto_and_none(client):
    # this small model answers in prose rather than calling: the answer is content
    for tool_choice in ("auto", "none"):
        choice = chat(client, tools=[WEATHER_TOOL], tool_choice=tool_choice).choices[0]
        assert choice.message.tool_calls is None
        assert choice.message.content
        assert choice.finish_reason in ("stop", "length")


def test_named_call_streams_argument_fragments(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    fragments = []
    for chunk in chat(client, tools=[WEATHER_TOOL], tool_choice=named, stream=True):
        deltas = chunk.choices[0].delta.tool_calls or []
        assert len(deltas) <= 1, chunk
        fragments += [delta.function.arguments for delta in deltas]
    assert len(fragments) > 3  # streamed as generated
    assert json.loads("".join(fragments)) == {"city": "Paris"}


def test_langchain(server):
    llm = ChatOpenAI(model=MODEL, base_url=f"{server.url}/v1", api_key="none", temperature=0)

    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        return "sunny"

    message = llm.bind_tools([get_weather], tool_choice="any").invoke("Weather in Paris?")
    assert message.tool_calls[0]["name"] == "get_weather"
    assert message.tool_calls[0]["args"] == {"city": "Paris"}
    capital = llm.with_structured_output(Capital).invoke(
        "What is the capital of France? Answer in JSON with city and country."
    )
    assert isinstance(capital, Capital) and capital.city == "Paris"
