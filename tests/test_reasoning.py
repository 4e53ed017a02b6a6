"""`--reasoning-parser`: a reasoning model's thinking goes to the message's `reasoning` (and
`reasoning_content`), its answer to `content`, in JSON and SSE, with tools, as vLLM splits them.

A random tiny model does not think: a guided regex makes its output take a reasoning model's
shape. The parser reads text, so the tags it writes character by character count as the tag
tokens would; the tokenizer gains <think> and </think> for the prompt's side."""

from __future__ import annotations

import json
import re

import openai
import pytest

from pagoda.server.protocol import ChatCompletionRequest, messages_for_template
from pagoda.server.reasoning import ReasoningParser, ReasoningStream
from tests.conftest import THINK_START_ID
from tests.serving import Server, failed_start

THOUGHT = "<think>[a-z]{3,8}</think>\n\n[a-z]{3,8}"
MESSAGES = [{"role": "user", "content": "think first"}]


def split(stream: ReasoningStream, pieces: list[str]) -> tuple[str, str]:
    reasoning = content = ""
    for piece in pieces:
        r, c = stream.feed(piece)
        reasoning, content = reasoning + r, content + c
    r, c = stream.finish()
    return reasoning + r, content + c


@pytest.mark.parametrize(
    ("thinking", "untagged", "pieces", "expected"),
    [
        (
            None,
            False,
            ["<th", "ink>", "plan", "</th", "ink>", "\n\nanswer"],
            ("plan", "\n\nanswer"),
        ),
        (None, False, ["  <think>", "a</think>b"], ("a", "b")),  # blank before the tag
        (None, False, ["just ", "an answer"], ("", "just an answer")),  # qwen3: untagged
        (None, True, ["still ", "thinking"], ("still thinking", "")),  # deepseek_r1: untagged
        (True, False, ["from the ", "prompt</think>ok"], ("from the prompt", "ok")),
        (True, False, ["cut by max_tok", "ens</thi"], ("cut by max_tokens</thi", "")),
        (False, False, ["answer <think>x</think>"], ("", "answer <think>x</think>")),
        (None, False, ["<"], ("", "<")),  # a lone start of a tag at the end is text
    ],
)
def test_streams_split_where_the_tags_are(thinking, untagged, pieces, expected):
    assert split(ReasoningStream(thinking, untagged), pieces) == expected


def test_the_prompts_last_tag_says_where_the_output_starts():
    parser = ReasoningParser(
        "qwen3", start_id=7, end_id=8, thinks_untagged=False, tags_are_special=False
    )
    assert parser.starts_thinking([1, 2, 7]) is True  # DeepSeek-R1's template: "<think>\n"
    assert parser.starts_thinking([1, 7, 3, 8, 4]) is False  # enable_thinking false
    assert parser.starts_thinking([1, 2, 3]) is None


def test_reasoning_sent_back_reaches_the_template_as_reasoning_content():
    for field in ("reasoning", "reasoning_content"):
        messages = [*MESSAGES, {"role": "assistant", "content": "ok", field: "because"}]
        req = ChatCompletionRequest.model_validate({"model": "m", "messages": messages})
        assert messages_for_template(req)[1]["reasoning_content"] == "because"


@pytest.fixture(scope="module")
def client(thinking_model, tmp_path_factory):
    """Model "m" under the qwen3 parser, "r1" under deepseek_r1 (same weights)."""
    catalog = tmp_path_factory.mktemp("catalog") / "models.yaml"
    entries = [
        f"  - id: {name}\n    kind: chat\n    source: {thinking_model}\n    max_model_len: 512\n"
        f"    engine: {{dtype: float32}}\n"
        f"    capabilities: {{tools: true, json: true, reasoning_parser: {parser}}}\n"
        for name, parser in (("m", "qwen3"), ("r1", "deepseek_r1"))
    ]
    catalog.write_text("models:\n" + "".join(entries))
    server = Server(["--catalog", str(catalog), "--strict-request-fields"]).wait_ready()
    yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    assert server.stop() == 0, server.log()


def think(client, max_tokens=40, model="m", **kwargs):
    """A reasoning model's shape, spelled by the regex: the start tag's own token is kept out
    (else the model would think freely from it, and a random model never stops)."""
    extra = {"guided_regex": THOUGHT, **kwargs.pop("extra_body", {})}
    bias = kwargs.pop("logit_bias", {str(THINK_START_ID): -100})
    return client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        seed=3,
        max_tokens=max_tokens,
        logit_bias=bias,
        extra_body=extra,
        **kwargs,
    )


def test_thinking_is_split_from_the_answer(client):
    """Before: the thinking, tags and all, was the content."""
    answer = think(client, n=2)
    for choice in answer.choices:
        message = choice.message.model_dump()
        assert re.fullmatch("[a-z]{3,8}", message["reasoning"])
        assert message["reasoning_content"] == message["reasoning"]
        assert re.fullmatch("\n\n[a-z]{3,8}", message["content"])
        assert choice.finish_reason == "stop"
    reasoning_tokens = answer.usage.completion_tokens_details.reasoning_tokens
    assert 2 <= reasoning_tokens < answer.usage.completion_tokens  # not the tags nor the answer
    hidden = think(client, n=2, extra_body={"include_reasoning": False})
    for shown, choice in zip(answer.choices, hidden.choices):
        assert choice.message.content == shown.message.content
        assert "reasoning" not in choice.message.model_dump()


def test_streams_send_the_thinking_then_the_answer(client):
    answer = think(client)
    whole = answer.choices[0].message.model_dump()
    reasoning = content = ""
    order = []
    options = {"include_usage": True}
    for chunk in think(client, stream=True, stream_options=options):
        if chunk.usage is not None:
            assert chunk.usage.model_dump() == answer.usage.model_dump()
        for choice in chunk.choices:
            delta = choice.delta.model_dump()
            if delta.get("reasoning"):
                assert delta["reasoning_content"] == delta["reasoning"]
                reasoning += delta["reasoning"]
                order.append("reasoning")
            if delta.get("content"):
                content += delta["content"]
                order.append("content")
    assert (reasoning, content) == (whole["reasoning"], whole["content"])
    assert order == sorted(order, key=["reasoning", "content"].index)  # no content first


def test_an_answer_without_thinking_is_all_content(client):
    for kwargs in ({}, {"chat_template_kwargs": {"enable_thinking": False}}):
        answer = think(client, extra_body={"guided_regex": "[a-z]{3,8}", **kwargs})
        message = answer.choices[0].message.model_dump()
        assert re.fullmatch("[a-z]{3,8}", message["content"]) and "reasoning" not in message
        assert answer.usage.completion_tokens_details.reasoning_tokens == 0


def test_tool_calls_are_read_after_the_thinking(client):
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    call = (
        r'<tool_call>\{"name": "get_weather", "arguments": \{"city": "[a-z]{3,6}"\}\}</tool_call>'
    )
    regex = "<think>[a-z]{3,8}</think>\n\n" + call
    for stream in (False, True):
        answer = think(client, 150, tools=tools, stream=stream, extra_body={"guided_regex": regex})
        if stream:
            chunks = list(answer)
            reasoning = "".join(
                c.choices[0].delta.model_dump().get("reasoning") or "" for c in chunks if c.choices
            )
            calls = [
                call for c in chunks if c.choices for call in c.choices[0].delta.tool_calls or []
            ]
            name, arguments = (
                calls[0].function.name,
                "".join(c.function.arguments or "" for c in calls),
            )
            finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        else:
            choice = answer.choices[0]
            reasoning = choice.message.model_dump()["reasoning"]
            assert choice.message.content is None
            (called,) = choice.message.tool_calls
            name, arguments, finish = (
                called.function.name,
                called.function.arguments,
                choice.finish_reason,
            )
        assert re.fullmatch("[a-z]{3,8}", reasoning)
        assert name == "get_weather" and re.fullmatch("[a-z]{3,6}", json.loads(arguments)["city"])
        assert finish == "tool_calls"


def test_a_grammar_holds_from_the_end_of_the_thinking(client):
    """deepseek_r1: the output starts in the thinking, which the regex does not constrain;
    once </think> comes, the answer follows the regex. Before: the regex held from the first
    token, so a reasoning model could not think under structured outputs."""
    end = THINK_START_ID + 1
    digits = {"guided_regex": "[0-9]{3}"}
    free = think(client, 8, model="r1", extra_body=digits, logit_bias={})
    message = free.choices[0].message.model_dump()
    assert free.choices[0].finish_reason == "length" and message["content"] is None
    assert not re.fullmatch("[0-9]*", message["reasoning"])  # no regex while it thinks
    assert free.usage.completion_tokens_details.reasoning_tokens == 8
    closed = think(client, 8, model="r1", extra_body=digits, logit_bias={str(end): 100})
    message = closed.choices[0].message.model_dump()
    assert message["reasoning"] == "" and re.fullmatch("[0-9]{3}", message["content"])
    # qwen3: the output's first token may open the thinking, or start the answer
    opened = think(client, 8, extra_body=digits, logit_bias={str(THINK_START_ID): 50, str(end): 60})
    message = opened.choices[0].message.model_dump()
    assert message["reasoning"] == "" and re.fullmatch("[0-9]{3}", message["content"])


def test_a_model_without_the_tags_is_refused_at_start(tiny_models):
    error = failed_start("--model", str(tiny_models["llama"]), "--reasoning-parser", "qwen3")
    assert "<think>" in error and "Traceback" not in error
