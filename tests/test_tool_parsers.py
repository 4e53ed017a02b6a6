"""The per-family parsers of tool calls in free text (tool_choice auto)."""

import json

import openai
import pytest

from pagoda.server.tool_parsers import PARSERS
from pagoda.server.tools import ToolCallStream, ToolPlan
from tests.serving import Server


def _parse(family: str, text: str):
    content, calls = PARSERS[family]().parse(text)
    return content, [(c.name, json.loads(c.arguments)) for c in calls]


def test_hermes_one_and_several_calls():
    text = 'Sure.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
    assert _parse("hermes", text) == ("Sure.", [("f", {"a": 1})])
    two = text + '\n<tool_call>{"name": "g", "arguments": "{\\"b\\": [2]}"}</tool_call>'
    assert _parse("hermes", two)[1] == [("f", {"a": 1}), ("g", {"b": [2]})]
    unclosed = '<tool_call>{"name": "f", "arguments": {}}'  # cut before the closing tag
    assert _parse("hermes", unclosed) == ("", [("f", {})])


def test_arguments_may_be_called_parameters_in_every_family():
    call = '{"name": "f", "parameters": {"city": "Paris"}}'
    assert _parse("hermes", f"<tool_call>{call}</tool_call>") == ("", [("f", {"city": "Paris"})])
    assert _parse("mistral", f"[TOOL_CALLS] [{call}]")[1] == [("f", {"city": "Paris"})]
    llama = '{"name": "f", "arguments": {"x": 1}}'
    assert _parse("llama3_json", llama) == ("", [("f", {"x": 1})])
    assert _parse("hermes", '<tool_call>{"name": "f"}</tool_call>')[1] == [("f", {})]


def test_llama3_json_calls():
    assert _parse("llama3_json", '{"name": "f", "parameters": {"x": "y"}}') == (
        "",
        [("f", {"x": "y"})],
    )
    several = '<|python_tag|>{"name": "f", "parameters": {}}; {"name": "g", "parameters": {}}'
    assert [name for name, _ in _parse("llama3_json", several)[1]] == ["f", "g"]


def test_mistral_calls():
    text = '[TOOL_CALLS] [{"name": "f", "arguments": {"q": 1}}, {"name": "g", "arguments": {}}]'
    assert _parse("mistral", text) == ("", [("f", {"q": 1}), ("g", {})])


@pytest.mark.parametrize(
    ("family", "text"),
    [
        ("hermes", "Just text, no call."),
        ("hermes", "<tool_call>{not json}</tool_call>"),
        ("hermes", '<tool_call>{"arguments": {}}</tool_call>'),  # no name
        ("hermes", '<tool_call>{"name": "f", "args": {"city": "Paris"}}</tool_call>'),
        ("llama3_json", '{"answer": 42}'),  # JSON, but not a call
        ("llama3_json", "The answer is {1}."),
        ("mistral", "[TOOL_CALLS] [oops"),
    ],
)
def test_what_is_not_a_call_stays_content(family, text):
    assert _parse(family, text) == (text, [])


def test_stream_holds_back_a_possible_marker_and_releases_it():
    stream = ToolCallStream(ToolPlan([], "auto", parser=PARSERS["hermes"]()))
    assert stream.feed("Hello <tool") == ("Hello", [])
    assert stream.feed("box> done ") == (" <toolbox> done", [])
    assert stream.finish() == (" ", [])


WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "days": {"type": "integer"},
        "metric": {"type": "boolean"},
    },
}


def test_pythonic_calls():
    text = '[get_weather(city="Paris", days=3), now()]'
    assert _parse("pythonic", text) == (
        "",
        [("get_weather", {"city": "Paris", "days": 3}), ("now", {})],
    )
    for not_a_call in ("[1, 2]", "[f(x)]", "[f(a=b)]", "[f(**kw)]", "Sure: [f()]", "[]"):
        assert _parse("pythonic", not_a_call) == (not_a_call, [])


def test_qwen3_coder_values_take_their_schema_types():
    parser = PARSERS["qwen3_coder"]({"get_weather": WEATHER})
    text = (
        "Checking.\n<tool_call>\n<function=get_weather>\n<parameter=city>\n1984\n</parameter>\n"
        "<parameter=days>\n3\n</parameter>\n<parameter=metric>\nTrue\n</parameter>\n"
        "<parameter=note>\n{not json\n</parameter>\n</function>\n</tool_call>"
    )
    content, (call,) = parser.parse(text)
    assert content == "Checking." and call.name == "get_weather"
    # a string stays a string even where it reads as a number; unknown parameters stay text
    assert json.loads(call.arguments) == {
        "city": "1984",
        "days": 3,
        "metric": True,
        "note": "{not json",
    }
    two = "<tool_call><function=a></function></tool_call><tool_call><function=b>"  # cut short
    assert [c.name for c in parser.parse(two)[1]] == ["a", "b"]
    assert parser.parse('<tool_call>{"name": "a"}</tool_call>')[1] == []


def test_a_whole_answer_format_streams_prose_at_once():
    """llama3_json and pythonic calls are the whole answer: prose before a bracket is shown,
    blank text before it is held."""
    stream = ToolCallStream(ToolPlan([], "auto", parser=PARSERS["pythonic"]()))
    assert stream.feed("  ") == ("", [])
    assert stream.feed("[f(a=1)]") == ("", [])
    assert stream.finish() == ("", [{"index": 0, **_call_dict("f", {"a": 1})}])
    prose = ToolCallStream(ToolPlan([], "auto", parser=PARSERS["pythonic"]()))
    assert prose.feed("See [1] ") == ("See", [])
    assert prose.finish() == (" [1] ", [])


def _call_dict(name: str, arguments: dict) -> dict:
    return {
        "id": ANY,
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments)},
    }


class _Any:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and other.startswith("call")


ANY = _Any()


@pytest.fixture(scope="module")
def client(tiny_models, tmp_path_factory):
    catalog = tmp_path_factory.mktemp("catalog") / "models.yaml"
    catalog.write_text(
        "models:\n"
        + "".join(
            f"  - id: {parser}\n    kind: chat\n    source: {tiny_models['llama']}\n"
            f"    max_model_len: 1024\n    engine: {{dtype: float32}}\n"
            f"    capabilities: {{tools: true, json: true, tool_call_parser: {parser}}}\n"
            for parser in ("pythonic", "qwen3_coder")
        )
    )
    server = Server(["--catalog", str(catalog)]).wait_ready()
    yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    assert server.stop() == 0, server.log()


@pytest.mark.parametrize(
    ("parser", "regex"),
    [
        ("pythonic", r'\[get_weather\(city="[a-z]{3,6}", days=[1-9]\)\]'),
        (
            "qwen3_coder",
            "<tool_call>\n<function=get_weather>\n<parameter=city>\n[a-z]{3,6}\n</parameter>\n"
            "<parameter=days>\n[1-9]\n</parameter>\n</function>\n</tool_call>",
        ),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_auto_calls_of_each_format_through_the_server(client, parser, regex, stream):
    """The model's output (spelled by a regex: a random model writes no calls) comes back as
    the SDK's tool_calls, with the schema's types."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
    answer = client.chat.completions.create(
        model=parser,
        messages=[{"role": "user", "content": "weather?"}],
        tools=tools,
        max_tokens=150,
        stream=stream,
        extra_body={"guided_regex": regex},
    )
    if stream:
        chunks = [c.choices[0] for c in answer if c.choices]
        calls = [call for c in chunks for call in c.delta.tool_calls or []]
        content = "".join(c.delta.content or "" for c in chunks)
        finish = chunks[-1].finish_reason
    else:
        calls, content = answer.choices[0].message.tool_calls, answer.choices[0].message.content
        finish = answer.choices[0].finish_reason
    (call,) = calls
    arguments = json.loads(call.function.arguments)
    assert call.function.name == "get_weather" and finish == "tool_calls" and not content
    assert isinstance(arguments["city"], str) and isinstance(arguments["days"], int)
