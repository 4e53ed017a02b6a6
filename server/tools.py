"""Tool calling on /v1/chat/completions: checking `tools` and `tool_choice`, putting the tools in
the prompt, and turning the output into `message.tool_calls` (whole or streamed).

`tool_choice` "required" and a named function are forced by a grammar: the output is a JSON
array of calls (required) or the arguments object itself (named), valid against the functions'
`parameters` by construction. "auto" lets the model write text or calls, which the model
family's parser (server/tool_parsers.py) finds. "none" leaves the tools in the prompt only.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from pagoda.engine.sampling_params import StructuredOutputsParams
from pagoda.engine.structured_output import SCHEMA_MAPS, VALUES
from pagoda.server.detokenizer import held_back_length
from pagoda.server.errors import APIError, invalid
from pagoda.server.structured import checked_constraint
from pagoda.server.tool_parsers import PARSERS, ParsedCall, ToolParser

_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
NO_PARAMETERS = {"type": "object", "properties": {}}
# calls in one answer under tool_choice "required": a model that repeats its call stops there
# rather than at max_tokens
MAX_CALLS = 16

# For chat templates that know no tools: the tools go into the system prompt, in the format the
# hermes parser reads.
FALLBACK_PROMPT = """You may call functions to answer. The functions, as JSON schemas:
{tools}
To call one, answer with its name and arguments as a JSON object in <tool_call></tool_call>
tags, for example:
<tool_call>
{{"name": "function_name", "arguments": {{"argument": "value"}}}}
</tool_call>"""


@dataclass(slots=True)
class Function:
    name: str
    parameters: dict
    description: str | None = None


@dataclass
class ToolPlan:
    """How one request uses its tools."""

    functions: list[Function]
    mode: str  # "none", "auto", "required" or "named"
    named: str | None = None
    parallel: bool = True
    parser: ToolParser | None = None

    @property
    def constraint(self) -> StructuredOutputsParams | None:
        if self.mode == "named":
            function = next(f for f in self.functions if f.name == self.named)
            return StructuredOutputsParams(json=function.parameters)
        if self.mode == "required":
            return StructuredOutputsParams(json=self._calls_schema())
        return None

    def _calls_schema(self) -> dict:
        defs: dict[str, Any] = {}
        call = [
            {
                "type": "object",
                "properties": {"name": {"const": f.name}, "arguments": _hoisted(f, defs)},
                "required": ["name", "arguments"],
            }
            for f in self.functions
        ]
        items = call[0] if len(call) == 1 else {"anyOf": call}
        schema = {"type": "array", "items": items, "minItems": 1}
        if defs:
            schema["$defs"] = defs
        return {**schema, "maxItems": MAX_CALLS if self.parallel else 1}

    def calls(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        """(content, calls) of a finished output."""
        if self.mode == "named":
            return None, [ParsedCall(self.named, text)]
        if self.mode == "required":  # the array may be cut by max_tokens: its complete calls
            values = _array_items(text)
            calls = [
                ParsedCall(v["name"], json.dumps(v["arguments"], ensure_ascii=False))
                for v in values
            ]
            return None, calls
        if self.mode == "auto":
            content, calls = self.parser.parse(text)
            calls = calls if self.parallel else calls[:1]
            return (content or None) if calls else content, calls
        return text, []


def _array_items(text: str) -> list:
    """The complete items of the JSON array that `text` is or begins."""
    decoder = json.JSONDecoder()
    items, i = [], text.find("[") + 1
    while i:
        while text[i : i + 1] in (" ", ","):
            i += 1
        try:
            item, i = decoder.raw_decode(text, i)
        except ValueError:  # the end of the array, or where it was cut
            return items
        items.append(item)
    return items


def _hoisted(function: Function, defs: dict[str, Any]) -> dict:
    """The function's parameters for their place in the calls schema, where refs resolve from
    the calls schema's root: with refs, the parameters and their definitions move into `defs`
    under names that start with the function's (no clash between tools), refs rewritten."""
    parameters = function.parameters
    if not _has_ref(parameters):
        return parameters
    name = function.name  # a function name has no '.', so these keys are all distinct
    prefixes = {"$defs": f"{name}.defs.", "definitions": f"{name}.definitions."}
    for key, prefix in prefixes.items():
        for sub_name, sub in (parameters.get(key) or {}).items():
            defs[prefix + sub_name] = _rerooted(sub, name, prefixes)
    body = {k: v for k, v in parameters.items() if k not in prefixes}
    defs[name] = _rerooted(body, name, prefixes)
    return {"$ref": f"#/$defs/{name}"}


def _has_ref(schema: Any) -> bool:
    if isinstance(schema, list):
        return any(_has_ref(item) for item in schema)
    if not isinstance(schema, dict):
        return False
    if isinstance(schema.get("$ref"), str):
        return True
    return any(
        _has_ref(list(value.values()) if key in SCHEMA_MAPS and isinstance(value, dict) else value)
        for key, value in schema.items()
        if key not in VALUES
    )


def _rerooted(schema: Any, name: str, prefixes: dict[str, str]) -> Any:
    """`schema` with its local refs pointing where `_hoisted` moved their targets."""
    if isinstance(schema, list):
        return [_rerooted(item, name, prefixes) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and value.startswith("#"):
            out[key] = _moved_ref(value, name, prefixes)
        elif key in SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {k: _rerooted(v, name, prefixes) for k, v in value.items()}
        else:
            out[key] = value if key in VALUES else _rerooted(value, name, prefixes)
    return out


def _moved_ref(ref: str, name: str, prefixes: dict[str, str]) -> str:
    for key, prefix in prefixes.items():
        if ref.startswith(start := f"#/{key}/"):
            return f"#/$defs/{prefix}{ref.removeprefix(start)}"
    return f"#/$defs/{name}{ref.removeprefix('#')}"  # into the parameters themselves


def plan_tools(req, parser_name: str, supports_tools: bool, flat: bool = False) -> ToolPlan | None:
    """The request's tool plan, or None without tools; a 400 for anything malformed. `flat`:
    the Responses API's shape, a function's fields beside its `type` (chat's sit under
    `function`), in `tools` and in a named `tool_choice`."""
    if req.tools is None:
        if req.tool_choice is not None:
            raise invalid("tool_choice is only allowed when tools are given", param="tool_choice")
        return None
    functions = _functions(req.tools, flat)
    mode, named = _choice(req.tool_choice, functions, flat)
    if mode != "none" and not supports_tools:
        raise invalid(f"The model '{req.model}' does not support tools.", param="tools")
    plan = ToolPlan(functions, mode, named, req.parallel_tool_calls is not False)
    if mode == "auto":
        plan.parser = PARSERS[parser_name]({f.name: f.parameters for f in functions})
    if (constraint := plan.constraint) is not None:
        checked_constraint(constraint, param="tools")
    return plan


def _functions(tools: Any, flat: bool) -> list[Function]:
    if not isinstance(tools, list) or not tools:
        raise invalid("tools must be a non-empty list of function tools", param="tools")
    functions = []
    for i, tool in enumerate(tools):
        where = f"tools.{i}"
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            # a hosted tool (web_search, file_search, code_interpreter, mcp, ...) would need
            # a service of OpenAI's: refused by name, never dropped
            given = f"{kind!r} tools do not run here: " if isinstance(kind, str) else ""
            message = f"{where}.type: {given}only 'function' tools are supported"
            raise invalid(message, param=f"{where}.type")
        spec = tool if flat else tool.get("function")
        if not isinstance(spec, dict):
            raise invalid(f"{where}.function: must be an object", param=f"{where}.function")
        where = where if flat else f"{where}.function"
        name = spec.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise invalid(
                f"{where}.name: must be 1-64 letters, digits, '_' or '-'", param=f"{where}.name"
            )
        parameters = _object_schema(spec.get("parameters"), name, f"{where}.parameters")
        checked_constraint(StructuredOutputsParams(json=parameters), param=f"{where}.parameters")
        description = spec.get("description")
        functions.append(Function(name, parameters, description))
    names = [f.name for f in functions]
    if len(set(names)) != len(names):
        raise invalid("tools: function names must be unique", param="tools")
    return functions


def _object_schema(parameters: Any, name: str, param: str) -> dict:
    """A function's parameters as a schema whose values are all objects (arguments are one):
    none or `{}` is the empty object's, as in vLLM; a root without a type gets "object"."""
    if parameters is None or parameters == {}:
        return NO_PARAMETERS
    if not isinstance(parameters, dict):
        raise invalid(f"{param}: must be a JSON schema object", param=param)
    kind = parameters.get("type")
    if kind is None and not any(k in parameters for k in _ROOTS_OF_ANY_TYPE):
        return {"type": "object", **parameters}
    if kind != "object":
        raise invalid(
            f"{param}: the arguments of '{name}' are an object, so its parameters need "
            f'"type": "object" at the root (got {json.dumps(kind)})',
            param=param,
        )
    return parameters


_NAMED_CHOICE = '{"type": "function", "function": {"name": ...}}'
# root keywords that could allow a non-object without a "type" beside them
_ROOTS_OF_ANY_TYPE = ("$ref", "anyOf", "oneOf", "enum", "const")


def _choice(choice: Any, functions: list[Function], flat: bool) -> tuple[str, str | None]:
    if choice is None:
        return "auto", None
    if choice in ("none", "auto", "required"):
        return choice, None
    name = None
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = choice.get("name") if flat else (choice.get("function") or {}).get("name")
    if not isinstance(name, str):
        named = '{"type": "function", "name": ...}' if flat else _NAMED_CHOICE
        raise invalid(
            f"tool_choice must be 'none', 'auto', 'required' or {named}", param="tool_choice"
        )
    if name not in {f.name for f in functions}:
        message = f"tool_choice names '{name}', which is not among the tools"
        raise invalid(message, param="tool_choice")
    return "named", name


# --- the prompt ------------------------------------------------------------------------------


def template_supports_tools(tokenizer) -> bool:
    template = getattr(tokenizer, "chat_template", None) or ""
    return "tools" in str(template)


def template_tools(plan: ToolPlan) -> list[dict]:
    return [
        {
            "type": "function",
            "function": {
                "name": f.name,
                **({"description": f.description} if f.description else {}),
                "parameters": f.parameters,
            },
        }
        for f in plan.functions
    ]


def with_fallback_prompt(messages: list[dict], plan: ToolPlan | None) -> list[dict]:
    """The messages for a template without tool support: past calls written as the model is
    asked to write them (always: the template would drop them, and the tool results after
    them would answer nothing), and the tools in the system prompt when `plan` offers them."""
    out = [dict(m) for m in messages]
    for message in out:
        for call in message.pop("tool_calls", None) or []:
            body = {key: call["function"][key] for key in ("name", "arguments")}
            written = json.dumps(body, ensure_ascii=False)
            message["content"] += f"\n<tool_call>\n{written}\n</tool_call>"
    if plan is None:
        return out
    tools = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in template_tools(plan))
    system = FALLBACK_PROMPT.format(tools=tools)
    if out and out[0]["role"] == "system":
        out[0]["content"] = f"{out[0]['content']}\n\n{system}"
    else:
        out.insert(0, {"role": "system", "content": system})
    return out


# --- the response ----------------------------------------------------------------------------


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_call_dicts(calls: list[ParsedCall]) -> list[dict]:
    return [
        {
            "id": new_call_id(),
            "type": "function",
            "function": {"name": call.name, "arguments": call.arguments},
        }
        for call in calls
    ]


@dataclass
class ToolCallStream:
    """One choice's stream: content deltas while there is no call, then call deltas, at most
    one per call in each chunk (clients merge same-index entries only across chunks). A named
    call streams its argument fragments as they come, the first with the call's id and name;
    other calls are sent whole when the output is complete."""

    plan: ToolPlan
    text: str = ""  # the output so far
    shown: int = 0  # of `text`, how much went out as content
    num_calls: int = 0

    def feed(self, text: str) -> tuple[str, list[dict]]:
        """(content delta, tool-call deltas) for newly generated text."""
        self.text += text
        if self.plan.mode == "named":
            if not self.num_calls:
                self.num_calls = 1
                return "", [self._named_head(text)]
            return "", [{"index": 0, "function": {"arguments": text}}] if text else []
        if self.plan.mode != "auto":
            return "", []
        marker = self.plan.parser.marker
        held = self.text.find(marker)
        if held < 0:  # hold back what may be the start of the marker
            held = len(self.text) - held_back_length(self.text, [marker])
        if self.plan.parser.whole_answer and not self.text[: max(held, 0)].strip():
            held = 0  # llama3_json, pythonic: the calls are the whole answer
        held = len(self.text[:held].rstrip())  # whitespace before a call is not content
        content = self.text[self.shown : max(held, self.shown)]
        self.shown += len(content)
        return content, []

    def finish(self) -> tuple[str, list[dict]]:
        """At the end: (content still held back, the calls' deltas)."""
        if self.plan.mode == "named":
            return "", []
        content, calls = self.plan.calls(self.text)
        if not calls:
            rest = "" if content is None else self.text[self.shown :]
            self.shown = len(self.text)
            return rest, []
        self.num_calls = len(calls)
        return "", [{"index": i, **call} for i, call in enumerate(tool_call_dicts(calls))]

    def _named_head(self, arguments: str) -> dict:
        return {
            "index": 0,
            "id": new_call_id(),
            "type": "function",
            "function": {"name": self.plan.named, "arguments": arguments},
        }


def unsupported(model_id: str, what: str, param: str) -> APIError:
    return invalid(f"The model '{model_id}' does not support {what}.", param=param)
