"""Request fields the server does not recognize: ignored with a warning, logged once per field
name and request kind (they are often a client's typo), or with `--strict-request-fields`
refused with OpenAI's 400 `Unrecognized request argument supplied: NAME`.

A field is recognized when its request model declares it, or lists it in `ignored_fields`
(OpenAI fields accepted on purpose without effect, such as `store` or `metadata`). The check
covers the top level of a body and the nested request models it holds (each message of
`messages`, a message's content parts, `stream_options`); free-form objects kept as sent
(`tools`, `response_format`, ...) are not checked.
"""

from __future__ import annotations

import functools
import logging
import types
import typing
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel

from pagoda.server.errors import invalid

logger = logging.getLogger(__name__)
MAX_LOGGED_NAMES = 1024  # a client inventing names cannot grow the set without bound
MAX_NAME_CHARS = 100

_strict = False
_logged: set[tuple[str, str]] = set()


def set_strict_request_fields(strict: bool) -> None:
    global _strict
    _strict = strict


def check_request_fields(model_cls: type[BaseModel], data: dict[str, Any]) -> None:
    """Warn about (or, strict, refuse) the fields of `data` that `model_cls` does not know."""
    for param, name in unrecognized(model_cls, data):
        if _strict:
            raise invalid(f"Unrecognized request argument supplied: {param}", param=param)
        _warn_once(model_cls.__name__, name)


def unrecognized(
    model_cls: type[BaseModel], data: dict[str, Any], prefix: str = "", name_prefix: str = ""
) -> Iterator[tuple[str, str]]:
    """(param, name) of each unrecognized field: `messages.0.foo` and `messages.foo`."""
    ignored = getattr(model_cls, "ignored_fields", frozenset())
    fields = _declared_fields(model_cls)
    for key, value in data.items():
        if key not in fields:
            if key not in ignored:
                yield f"{prefix}{key}", f"{name_prefix}{key}"
            continue
        nested = fields[key]
        if nested is None:
            continue
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        for index, item in items:
            if isinstance(item, dict):
                where = f"{prefix}{key}." if index is None else f"{prefix}{key}.{index}."
                yield from unrecognized(nested, item, where, f"{name_prefix}{key}.")


@functools.cache
def _declared_fields(model_cls: type[BaseModel]) -> dict[str, type[BaseModel] | None]:
    """Each field `model_cls` declares, with the request model its value holds: None where it
    holds none, or a union the model tells apart by its own rules. Once per class: read from
    the annotations on every request, this was two thirds of a body's parsing (50 us)."""
    fields = {}
    for name, field in model_cls.model_fields.items():
        nested = _request_models(field.annotation)
        fields[name] = nested[0] if len(nested) == 1 else None
    return fields


def _request_models(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) in (list, typing.Union, types.UnionType):
        found = [m for arg in typing.get_args(annotation) for m in _request_models(arg)]
        return list(dict.fromkeys(found))
    return []


def _warn_once(kind: str, name: str) -> None:
    if (kind, name) in _logged or len(_logged) >= MAX_LOGGED_NAMES:
        return
    _logged.add((kind, name))
    logger.warning(
        "ignoring the unrecognized field %r of a %s (a typo? --strict-request-fields refuses "
        "it; logged once)",
        name[:MAX_NAME_CHARS],
        kind,
    )
