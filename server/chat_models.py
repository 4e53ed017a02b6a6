"""The chat models `pagoda serve` runs (the catalog's enabled chat entries, or --model), each
with its weights' source and commit, chat template and LoRA adapters found and checked, and a
local folder's config.json read. This needs none of the server's heavy imports, so that `serve`
does it before them (server/preflight.py): a typo in a source, a revision, a template or an
adapter, or a model the engine does not run, fails the start in a second, not after them."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pagoda.engine.model_folder import gguf_file_of
from pagoda.server.catalog import (
    Capabilities,
    CatalogEntry,
    entry_error,
    hub_commit,
    resolve_chat_template,
    resolve_revision,
    resolve_source,
)
from pagoda.server.chat_template import ChatTemplate, chat_template_flag
from pagoda.server.lora import LoraAdapter, catalog_adapters, flag_adapters
from pagoda.server.overload import DEFAULT_MAX_WAITING_REQUESTS

# flags that mean what they mean for `vllm serve`, and override the catalog's settings
ENGINE_FLAGS = (
    "max_model_len",
    "dtype",
    "device",
    "max_num_seqs",
    "max_num_batched_tokens",
    "kv_cache_memory",
    "enforce_eager",
    "cpu_threads",
    "tensor_parallel_size",
    "nnodes",
    "node_rank",
    "master_addr",
    "master_port",
    "distributed_timeout_s",
    "generation_config",
    "override_generation_config",
    "max_lora_rank",
    "max_loras",
)


@dataclass(slots=True)
class ChatModel:
    id: str
    source: str  # an absolute path or a hub id
    revision: str | None  # the hub commit it is served at (None: a local path)
    engine_kwargs: dict[str, Any]  # engine.EngineConfig's settings: the entry's, then the flags'
    owned_by: str = "pagoda"
    # --model: tools and structured outputs on, auto tool calls read by --tool-call-parser
    capabilities: Capabilities | None = None
    max_waiting_requests: int = DEFAULT_MAX_WAITING_REQUESTS
    data_parallel_size: int = 1  # engine replicas (server/replicas.py)
    entry: CatalogEntry | None = None  # where it comes from, for errors (None: --model)
    chat_template: ChatTemplate | None = None  # instead of the tokenizer's
    adapters: list[LoraAdapter] = field(default_factory=list)  # served on its engine

    @property
    def lora_modules(self) -> dict[str, str] | None:
        """EngineConfig's lora_modules (name -> folder), for a model with adapters."""
        return {a.name: a.folder for a in self.adapters} or None


def chat_models(args: argparse.Namespace, entries: list[CatalogEntry]) -> list[ChatModel]:
    """--model's, or those of the catalog's `entries` that are enabled chat models. Raises
    ValueError (CatalogError for an entry, naming it) where one cannot be served."""
    overrides = {k: getattr(args, k) for k in ENGINE_FLAGS if getattr(args, k) is not None}
    if args.model:
        models = [_flag_model(args, overrides)]
    else:
        chat = [e for e in entries if e.enabled and e.kind == "chat"]
        models = [_catalog_model(e, args, overrides) for e in chat]
    for model in models:
        _check_folder(model)
    return models


def _flag_model(args: argparse.Namespace, overrides: dict) -> ChatModel:
    name = args.served_model_name or args.model
    source, revision = model_flag_source(args)
    return ChatModel(
        name,
        source,
        revision,
        overrides,
        capabilities=Capabilities(
            tools=True,
            json=True,
            tool_call_parser=args.tool_call_parser or "hermes",
            reasoning_parser=args.reasoning_parser,
        ),
        max_waiting_requests=args.max_waiting_requests or DEFAULT_MAX_WAITING_REQUESTS,
        data_parallel_size=args.data_parallel_size,
        chat_template=chat_template_flag(args.chat_template),
        adapters=flag_adapters(args.lora_modules or [], name),
    )


def _catalog_model(entry: CatalogEntry, args: argparse.Namespace, overrides: dict) -> ChatModel:
    return ChatModel(
        entry.id,
        resolve_source(entry),
        resolve_revision(entry),
        {**entry.engine_kwargs(), **overrides},
        entry.owned_by,
        entry.capabilities,
        args.max_waiting_requests or entry.max_waiting_requests,
        args.data_parallel_size,
        entry,
        resolve_chat_template(entry),
        catalog_adapters(entry),
    )


def model_flag_source(args: argparse.Namespace) -> tuple[str, str | None]:
    """--model's weights as a catalog entry's are found: a local path (made absolute), or a hub
    id and the commit of its --revision (default: its default branch)."""
    path = Path(args.model).expanduser()
    source = str(path.resolve()) if path.exists() else args.model
    try:
        return source, hub_commit(source, args.revision)
    except ValueError as exc:
        raise ValueError(f"{'--revision' if args.revision else '--model'}: {exc}") from None


def _check_folder(model: ChatModel) -> None:
    """A local folder's files, as the engine's loader checks them (engine/model_folder.py), so
    that a folder it would refuse fails the start before the server's imports. A hub id's are
    checked as they are downloaded, and a .gguf file's as its header is read."""
    if not Path(model.source).is_dir():
        return
    try:
        gguf_file_of(Path(model.source))
    except ValueError as exc:
        if model.entry is None:
            raise ValueError(f"--model: {exc}") from None
        raise entry_error(model.entry, str(exc)) from None
