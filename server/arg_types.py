"""The types of the command line's values: each checks its value as argparse reads it, so that
a bad one is a one-line error naming the option, before anything loads."""

from __future__ import annotations

import argparse
import json
import math
import urllib.parse
from collections.abc import Callable
from typing import NamedTuple

from pagoda.server.catalog import DEVICE_PATTERN, parse_bytes


def seconds(text: str) -> float:
    """A duration option's value: a positive, finite number of seconds."""
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def at_least(minimum: int) -> Callable[[str], int]:
    """An integer option's type: `minimum` or more (argparse names the option in its error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def port(text: str) -> int:
    value = at_least(1)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port in 1-65535, got {value}")
    return value


def size(text: str) -> int:
    """A byte size option's value (`2GiB`, `512MiB`, a number of bytes): positive."""
    try:
        value = parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text!r}")
    return value


def device(text: str) -> str:
    if not DEVICE_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def public_url(text: str) -> str:
    """--public-url: the absolute http(s) URL clients reach the server at (image URLs start
    with it; without a scheme they would be relative paths no client can fetch)."""
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise argparse.ArgumentTypeError(
            f"expected an http:// or https:// URL such as https://example.com/pagoda, got {text!r}"
        )
    return text


def generation_overrides(text: str) -> dict:
    """--override-generation-config: a JSON object (its fields are checked as the engine
    starts, engine/sampling_defaults.py)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"expected a JSON object such as '{{\"temperature\": 0.7}}', got {text!r}"
        )
    return value


class LoraFlag(NamedTuple):
    name: str
    path: str  # a folder or a hub id
    base_model_name: str | None = None  # the model it is for (vLLM's JSON form)


def lora_module(text: str) -> LoraFlag:
    """A --lora-modules value, as vLLM takes it: NAME=PATH, or a JSON object with "name",
    "path" and optionally "base_model_name"."""
    if text.lstrip().startswith("{"):
        return _lora_module_json(text)
    name, equals, path = text.partition("=")
    if not (equals and name.strip() and path.strip()) or any(c.isspace() for c in name):
        raise argparse.ArgumentTypeError(
            f"expected NAME=PATH or a JSON object with name and path, got {text!r}"
        )
    return LoraFlag(name, path)


def _lora_module_json(text: str) -> LoraFlag:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"invalid JSON ({exc.msg}): {text!r}") from None
    fields = {"name", "path", "base_model_name"}
    strings = isinstance(value, dict) and all(isinstance(v, str) and v for v in value.values())
    if not strings or not {"name", "path"} <= value.keys() <= fields:
        raise argparse.ArgumentTypeError(
            'expected {"name": ..., "path": ...} (and optionally "base_model_name"), '
            f"all non-empty strings, got {text!r}"
        )
    if any(c.isspace() for c in value["name"]):
        raise argparse.ArgumentTypeError(f"an adapter's name has no spaces, got {value['name']!r}")
    return LoraFlag(value["name"], value["path"], value.get("base_model_name"))
