"""What one HTTP connection may hold, set on purpose for `pagoda serve` (uvicorn's defaults
leave headers unbounded under httptools, and connections unlimited); docs/reliability.md."""

from __future__ import annotations

import argparse
from typing import Any

from pagoda.server.app import DEFAULT_BODY_TIMEOUT_S
from pagoda.server.generation import DEFAULT_STREAM_SEND_TIMEOUT_S

MAX_HEADER_BYTES = 64 << 10  # the request line and headers: long JWTs and cookies fit


def add_connection_options(serve: argparse.ArgumentParser) -> None:
    serve.add_argument(
        "--http",
        choices=["h11", "httptools"],
        default="h11",
        help="HTTP/1.1 parser: h11 bounds the request head (64 KiB); httptools does not",
    )
    serve.add_argument(
        "--timeout-keep-alive",
        type=int,
        default=5,
        help="seconds an idle keep-alive connection stays open (behind a load balancer: "
        "more than its idle timeout)",
    )
    serve.add_argument(
        "--limit-concurrency",
        type=int,
        default=4096,
        help="connections and requests at once; beyond it uvicorn answers 503",
    )
    serve.add_argument("--backlog", type=int, default=2048, help="connections waiting for accept")
    serve.add_argument(
        "--request-body-timeout",
        type=float,
        default=DEFAULT_BODY_TIMEOUT_S,
        help="seconds a request body may take to arrive; then 408",
    )
    serve.add_argument(
        "--stream-send-timeout",
        type=float,
        default=DEFAULT_STREAM_SEND_TIMEOUT_S,
        help="seconds a stream waits for a client that stopped reading; then it is cut",
    )


def uvicorn_limits(args: argparse.Namespace) -> dict[str, Any]:
    """uvicorn.Config keyword arguments for the connection limits of `args`."""
    return {
        "http": args.http,
        "h11_max_incomplete_event_size": MAX_HEADER_BYTES,
        "timeout_keep_alive": args.timeout_keep_alive,
        "limit_concurrency": args.limit_concurrency,
        "backlog": args.backlog,
    }
