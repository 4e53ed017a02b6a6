"""What `pagoda serve` checks before it imports the server's modules (torch, transformers,
xgrammar: 5-8 s on two cores) and forks its workers' forkserver: the catalog parses, the chat
models' sources, revisions, templates and adapters are found (server/chat_models.py), the local
model folders hold what their workers load (engine/model_folder.py), the key database opens and
the port binds. A typo in any of them fails the start in about a second."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from pagoda.engine.model_folder import check_sentence_transformers_folder
from pagoda.logs import LogSettings, setup_logging
from pagoda.server.catalog import (
    CatalogEntry,
    CatalogError,
    entry_error,
    load_catalog,
    resolve_source,
)
from pagoda.server.chat_models import ChatModel, chat_models
from pagoda.server.keys import commands as key_commands
from pagoda.server.keys.gateway import Gateway

logger = logging.getLogger("pagoda")


@dataclass(slots=True)
class Preflight:
    gateway: Gateway
    sock: socket.socket
    entries: list[CatalogEntry]  # the catalog's, read once ([] with --model)
    chat_models: list[ChatModel]

    @property
    def worker_kinds(self) -> set[str]:
        """Those of the models served: what the workers' forkserver imports."""
        kinds = {entry.kind for entry in self.entries if entry.enabled}
        return (kinds | {"chat"}) if self.chat_models else kinds


def preflight(args: argparse.Namespace) -> Preflight | None:
    """Logging set up, then the checks; an error is logged on one line and exits 1. None on a
    node that runs only tensor-parallel ranks: it has no catalog, keys or port of its own."""
    settings = LogSettings(args.log_format, args.log_level, args.log_probe_requests)
    setup_logging(settings, libraries=False)  # serve.run routes them, as it imports them
    try:
        check_parallel_args(args)
        if is_rank_node(args):
            return None
        entries = [] if args.model else load_catalog(args.catalog)
        sock = bind(args.host, args.port)
        gateway = key_commands.open_gateway(args, api_keys(args), entries)
        if gateway.engine is not None:
            # no connection stays open across the fork of the workers' forkserver (a fork must
            # not use its parent's): the server opens a new one at its first query
            gateway.engine.dispose()
        check_worker_folders(entries)
        # last: it may ask the hub, and download adapters
        return Preflight(gateway, sock, entries, chat_models(args, entries))
    except (CatalogError, RuntimeError, ValueError) as exc:
        logger.error("%s", exc)
        sys.exit(1)


def check_worker_folders(entries: list[CatalogEntry]) -> None:
    """The enabled embedding and rerank entries' local folders, read as their workers would
    load them (a hub id's files are checked as they are downloaded)."""
    for entry in entries:
        if not entry.enabled or entry.kind not in ("embedding", "rerank"):
            continue
        source = Path(resolve_source(entry))
        if source.is_dir():
            try:
                check_sentence_transformers_folder(source, cross_encoder=entry.kind == "rerank")
            except ValueError as exc:
                raise entry_error(entry, str(exc)) from None


def check_parallel_args(args: argparse.Namespace) -> None:
    if args.data_parallel_size > 1 and (args.nnodes or 1) > 1:
        raise ValueError(
            "--data-parallel-size runs its replicas on one machine: --nnodes must be 1 with it"
        )
    several_nodes = (args.nnodes or 1) > 1 or args.master_port is not None
    if several_nodes and not args.model:
        raise ValueError("--nnodes and --master-port serve one model: give it with --model")


def is_rank_node(args: argparse.Namespace) -> bool:
    return (args.node_rank or 0) > 0


def api_keys(args: argparse.Namespace) -> list[str]:
    from_env = [k.strip() for k in os.environ.get("PAGODA_API_KEYS", "").split(",")]
    return [k for k in [*args.api_key, *from_env] if k]


def bind(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the models load, so that a port in use or an address
    this machine does not have fails the start at once, not minutes later. It listens (uvicorn
    makes it) only once they have: until then a connection is refused, not left waiting."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise RuntimeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock
