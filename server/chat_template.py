"""A served model's chat template overridden (vLLM's `--chat-template`, the catalog's
`chat_template`): read from a file or given inline, and checked before any model loads."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pagoda.logs import describe_error

# vLLM's test: a value that names no readable file is the template itself if it has one of
# these (any template has braces); without them it was meant as a file's path
JINJA_CHARS = "{}\n"


@dataclass(frozen=True)
class ChatTemplate:
    text: str
    origin: str  # the file it was read from, or "inline text": for the start-up log


def read_chat_template(value: str, base_dir: Path) -> ChatTemplate:
    """The template `value` names: the file at that path (a relative one from `base_dir`),
    else the template text itself. A ValueError says why it cannot serve."""
    path = base_dir / os.path.expanduser(value)
    try:
        template = ChatTemplate(path.read_text(encoding="utf-8"), str(path))
    except (OSError, ValueError) as exc:  # ValueError: a null byte in the name, not UTF-8
        if not any(char in value for char in JINJA_CHARS):
            raise ValueError(f"cannot read the template file {path}: {_reason(exc)}") from None
        template = ChatTemplate(value, "inline text")
    check_jinja(template.text)
    return template


def chat_template_flag(value: str | None) -> ChatTemplate | None:
    """--chat-template's template (a relative path from the working folder), checked."""
    if value is None:
        return None
    try:
        return read_chat_template(value, Path.cwd())
    except ValueError as exc:
        raise ValueError(f"--chat-template: {exc}") from None


def check_jinja(text: str) -> None:
    """A ValueError unless `text` compiles as a chat template: by transformers' own compiler
    (its Jinja environment has loop controls, a {% generation %} tag and its own tojson), so
    that a template that passes here is one every request can render with."""
    import jinja2
    from transformers.utils.chat_template_utils import _compile_jinja_template

    if not text.strip():
        raise ValueError("the template is empty")
    try:
        _compile_jinja_template(text)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"not a Jinja template: {exc.message} (line {exc.lineno})") from None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return describe_error(exc)
