"""Structured outputs on the HTTP side: OpenAI's `response_format` and vLLM's extra fields
(`structured_outputs`, `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`) turned
into the engine's `StructuredOutputsParams`, checked here so that a bad schema is a 400 before
anything reaches the engine."""

from __future__ import annotations

import re
from typing import Any

from pagoda.engine.sampling_params import StructuredOutputsParams
from pagoda.engine.structured_output import build_grammar
from pagoda.server.errors import invalid

_SCHEMA_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
GUIDED_FIELDS = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}


def checked_constraint(params: StructuredOutputsParams, param: str) -> StructuredOutputsParams:
    """`params`, after building its grammar (cheap: no tokenizer); a 400 naming the problem."""
    try:
        build_grammar(params)
    except ValueError as exc:
        raise invalid(f"{param}: {exc}", param=param) from None
    return params


def response_format_constraint(response_format: Any) -> StructuredOutputsParams | None:
    """Chat's `response_format`: the json_schema's fields sit under `json_schema`."""
    kind = _format_type(response_format, "response_format")
    if kind != "json_schema":
        return _plain_format_constraint(kind)
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise invalid(
            "response_format.json_schema: required with type 'json_schema'",
            param="response_format.json_schema",
        )
    return _json_schema_constraint(spec, "response_format.json_schema")


def text_format_constraint(text: Any) -> StructuredOutputsParams | None:
    """The Responses API's `text.format`: the same formats, the json_schema's fields beside
    its `type`."""
    if text is None:
        return None
    if not isinstance(text, dict):
        raise invalid("text must be an object", param="text")
    kind = _format_type(text.get("format"), "text.format")
    if kind != "json_schema":
        return _plain_format_constraint(kind)
    return _json_schema_constraint(text["format"], "text.format")


def _format_type(value: Any, param: str) -> str | None:
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in ("text", "json_object", "json_schema"):
        raise invalid(
            f"{param}.type must be 'text', 'json_object' or 'json_schema'", param=f"{param}.type"
        )
    return kind


def _plain_format_constraint(kind: str | None) -> StructuredOutputsParams | None:
    return StructuredOutputsParams(json_object=True) if kind == "json_object" else None


def _json_schema_constraint(spec: dict, param: str) -> StructuredOutputsParams:
    name = spec.get("name")
    if not isinstance(name, str) or not _SCHEMA_NAME.match(name):
        raise invalid(
            f"{param}.name: required, 1-64 letters, digits, '_' or '-'", param=f"{param}.name"
        )
    schema = spec.get("schema", {"type": "object"})
    if not isinstance(schema, dict):
        raise invalid(f"{param}.schema: must be a JSON schema object", param=f"{param}.schema")
    if spec.get("strict") not in (None, True, False):
        raise invalid(f"{param}.strict: must be a boolean", param=f"{param}.strict")
    return checked_constraint(StructuredOutputsParams(json=schema), param=f"{param}.schema")


def extra_fields(body: Any) -> dict[str, Any]:
    """vLLM's constraint fields that `body` gives, by name."""
    given = {name: getattr(body, name) for name in ("structured_outputs", *GUIDED_FIELDS)}
    return {name: value for name, value in given.items() if value is not None}


def extra_constraint(body: Any) -> StructuredOutputsParams | None:
    """vLLM's fields: `structured_outputs` (an object) or one of the older `guided_*`."""
    given = extra_fields(body)
    if not given:
        return None
    if len(given) > 1:
        names = ", ".join(given)
        raise invalid(f"give one structured output constraint, got {names}", param=names)
    name, value = next(iter(given.items()))
    if name == "structured_outputs":
        if not isinstance(value, dict):
            raise invalid("structured_outputs must be an object", param=name)
        known = {"json", "regex", "choice", "grammar", "json_object"}
        value = {k: v for k, v in value.items() if k in known and v is not None}
    else:
        value = {GUIDED_FIELDS[name]: value}
    try:
        params = StructuredOutputsParams(**value)
    except (ValueError, TypeError) as exc:
        raise invalid(f"{name}: {exc}", param=name) from None
    return checked_constraint(params, param=name)
