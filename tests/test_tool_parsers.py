"""The per-family parsers of tool calls in free text (tool_choice auto)."""

import json

import pytest

from pagoda.server.tool_parsers import PARSERS
from pagoda.server.tools import ToolCallStream, ToolPlan


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
