"""Tool calls in a model's free text (`tool_choice: "auto"`), one parser per model family.

Each parser splits a completed output into its plain content and its calls; `marker` is the
text that opens the first call, so that a stream can show content until it appears. Output that
looks like a call but does not parse stays content: nothing the model wrote is lost.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass


@dataclass(slots=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text of an object


def _call(obj: object) -> ParsedCall | None:
    """`{"name": ..., "arguments": {...}}` (or "parameters", as Llama writes it) as a call."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    key = next((k for k in ("arguments", "parameters") if k in obj), None)
    if key is None and len(obj) > 1:  # arguments under some other name: not a call
        return None
    arguments = obj[key] if key else {}
    if isinstance(arguments, str):  # some models write the arguments JSON-encoded
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ParsedCall(obj["name"], json.dumps(arguments, ensure_ascii=False))


def _json_values(text: str) -> list[object] | None:
    """The JSON values in `text`, one after another (separated by whitespace or ';')."""
    decoder = json.JSONDecoder()
    values, i = [], 0
    while True:
        while i < len(text) and (text[i].isspace() or text[i] == ";"):
            i += 1
        if i == len(text):
            return values
        try:
            value, i = decoder.raw_decode(text, i)
        except ValueError:
            return None
        values.append(value)


class _Parser:
    marker: str  # the text that opens the first call
    needs_special_tokens = False  # the marker is a special token: keep their text
    whole_answer = False  # the calls are the whole answer (blank text before them is held)

    def __init__(self, schemas: dict[str, dict] | None = None) -> None:
        self.schemas = schemas or {}  # each function's parameters schema, by name


class _ToolCallBlocks(_Parser):
    """Calls in `<tool_call>...</tool_call>` blocks after the content (the last may be cut
    short); `_calls` reads one block's body, None where it is not calls."""

    marker = "<tool_call>"
    _block = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def parse(self, text: str) -> tuple[str, list[ParsedCall]]:
        start = text.find(self.marker)
        if start < 0:
            return text, []
        calls = []
        for body in self._block.findall(text[start:]):
            parsed = self._calls(body)
            if parsed is None:
                return text, []
            calls += parsed
        return text[:start].rstrip(), calls

    def _calls(self, body: str) -> list[ParsedCall] | None:
        raise NotImplementedError


class HermesParser(_ToolCallBlocks):
    """Qwen, Hermes and most ChatML models: `<tool_call>{"name": ..., "arguments": {...}}
    </tool_call>`, one block per call (also the fallback prompt's format)."""

    def _calls(self, body: str) -> list[ParsedCall] | None:
        values = _json_values(body)
        parsed = [_call(v) for v in values or []]
        return parsed if values and None not in parsed else None


class Llama3JsonParser(_Parser):
    """Llama 3.x: the whole answer is `{"name": ..., "parameters": {...}}` (several separated by
    ';'), possibly after `<|python_tag|>`."""

    marker = "{"
    whole_answer = True

    def parse(self, text: str) -> tuple[str, list[ParsedCall]]:
        body = text.strip().removeprefix("<|python_tag|>").strip()
        if not body.startswith("{"):
            return text, []
        values = _json_values(body)
        calls = [_call(v) for v in values or []]
        if not values or None in calls:
            return text, []
        return "", calls


class MistralParser(_Parser):
    """Mistral: `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]` (a special token, so the
    output is detokenized with special tokens kept)."""

    marker = "[TOOL_CALLS]"
    needs_special_tokens = True

    def parse(self, text: str) -> tuple[str, list[ParsedCall]]:
        start = text.find(self.marker)
        if start < 0:
            return text, []
        values = _json_values(text[start + len(self.marker) :])
        items = [item for v in values or [] for item in (v if isinstance(v, list) else [v])]
        calls = [_call(item) for item in items]
        if not items or None in calls:
            return text, []
        return text[:start].rstrip(), calls


class PythonicParser(_Parser):
    """Llama 3.2 and 4 and others: the whole answer is a Python list of calls with keyword
    arguments, `[get_weather(city="Paris"), now()]` (Llama 4 wraps it in special tokens,
    which detokenizing drops)."""

    marker = "["
    whole_answer = True

    def parse(self, text: str) -> tuple[str, list[ParsedCall]]:
        try:
            tree = ast.parse(text.strip(), mode="eval").body
        except SyntaxError:
            return text, []
        if not isinstance(tree, ast.List) or not tree.elts:
            return text, []
        calls = [_python_call(node) for node in tree.elts]
        return ("", calls) if None not in calls else (text, [])


def _python_call(node: ast.expr) -> ParsedCall | None:
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
        return None
    try:
        arguments = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
    except ValueError:  # not a literal (a name, an expression)
        return None
    if None in arguments:  # **kwargs
        return None
    return ParsedCall(node.func.id, json.dumps(arguments, ensure_ascii=False))


class Qwen3CoderParser(_ToolCallBlocks):
    """Qwen3-Coder: `<tool_call><function=NAME><parameter=KEY>value</parameter>...</function>
    </tool_call>`, each value as plain text: it is read as JSON where the function's schema
    gives the parameter another type than string."""

    _function = re.compile(r"<function=([^>\n]+)>(.*?)(?:</function>|$)", re.DOTALL)
    _parameter = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.DOTALL)

    def _calls(self, body: str) -> list[ParsedCall] | None:
        match = self._function.fullmatch(body.strip())
        if match is None:
            return None
        name, inside = match.group(1).strip(), match.group(2)
        arguments = {
            key.strip(): self._value(name, key.strip(), value)
            for key, value in self._parameter.findall(inside)
        }
        return [ParsedCall(name, json.dumps(arguments, ensure_ascii=False))]

    def _value(self, function: str, key: str, text: str) -> object:
        schema = self.schemas.get(function, {}).get("properties", {}).get(key, {})
        if schema.get("type", "string") == "string":
            return text
        try:
            return json.loads(text)
        except ValueError:
            lowered = text.strip().lower()
            return {"true": True, "false": False}.get(lowered, text)


PARSERS = {
    "hermes": HermesParser,
    "llama3_json": Llama3JsonParser,
    "mistral": MistralParser,
    "pythonic": PythonicParser,
    "qwen3_coder": Qwen3CoderParser,
}
ToolParser = _Parser
