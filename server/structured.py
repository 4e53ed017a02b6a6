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
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind != "json_schema":
        raise invalid(
            "response_format.type must be 'text', 'json_object' or 'json_schema'",
            param="response_format.type",
        )
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise invalid(
            "response_format.json_schema: required with type 'json_schema'",
            param="response_format.json_schema",
        )
    name = spec.get("name")
    if not isinstance(name, str) or not _SCHEMA_NAME.match(name):
        raise invalid(
            "response_format.json_schema.name: required, 1-64 letters, digits, '_' or '-'",
            param="response_format.json_schema.name",
        )
    schema = spec.get("schema", {"type": "object"})
    if not isinstance(schema, dict):
        raise invalid(
            "response_format.json_schema.schema: must be a JSON schema object",
            param="response_format.json_schema.schema",
        )
    if spec.get("strict") not in (None, True, False):
        raise invalid(
            "response_format.json_schema.strict: must be a boolean",
            param="response_format.json_schema.strict",
        )
    params = StructuredOutputsParams(json=schema)
    return checked_constraint(params, param="response_format.json_schema.schema")


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
