"""Tool calls in a model's free text (`tool_choice: "auto"`), one parser per model family.

Each parser splits a completed output into its plain content and its calls; `marker` is the
text that opens the first call, so that a stream can show content until it appears. Output that
looks like a call but does not parse stays content: nothing the model wrote is lost.
"""

from __future__ import annotations

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


class HermesParser:
    """Qwen, Hermes and most ChatML models: `<tool_call>{"name": ..., "arguments": {...}}
    </tool_call>`, one block per call (also the fallback prompt's format)."""

    marker = "<tool_call>"
    needs_special_tokens = False
    _block = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def parse(self, text: str) -> tuple[str, list[ParsedCall]]:
        start = text.find(self.marker)
        if start < 0:
            return text, []
        calls = []
        for body in self._block.findall(text[start:]):
            values = _json_values(body)
            parsed = [_call(v) for v in values or []]
            if not values or None in parsed:
                return text, []
            calls += parsed
        return text[:start].rstrip(), calls


class Llama3JsonParser:
    """Llama 3.x: the whole answer is `{"name": ..., "parameters": {...}}` (several separated by
    ';'), possibly after `<|python_tag|>`."""

    marker = "{"
    needs_special_tokens = False

    def parse(self, text: str) -> tuple[str, list[ParsedCall]]:
        body = text.strip().removeprefix("<|python_tag|>").strip()
        if not body.startswith("{"):
            return text, []
        values = _json_values(body)
        calls = [_call(v) for v in values or []]
        if not values or None in calls:
            return text, []
        return "", calls


class MistralParser:
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


PARSERS = {"hermes": HermesParser, "llama3_json": Llama3JsonParser, "mistral": MistralParser}
ToolParser = HermesParser | Llama3JsonParser | MistralParser
