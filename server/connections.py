"""What one HTTP connection may hold, set on purpose for `pagoda serve` (uvicorn's defaults
leave headers unbounded under httptools, and connections unlimited); docs/reliability.md."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from starlette.responses import JSONResponse
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from pagoda.server.errors import APIError

logger = logging.getLogger(__name__)
MAX_HEADER_BYTES = 64 << 10  # the request line and headers: long JWTs and cookies fit


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the request head bounded, as h11 bounds it: llhttp
    keeps no limit of its own, and httptools buffers a header until its end.

    A head counts the reads that start and end inside it, so it is refused once more than
    `MAX_HEADER_BYTES` arrived after the read it began in (a read is at most 256 KiB): never
    a head within the bound, even when a pipelined request's body shares its first read.

    Beyond --limit-concurrency a request gets a 503 in the OpenAI error shape with
    Retry-After (uvicorn's own answer is plain text)."""

    in_head = False
    head_bytes = 0

    def __init__(self, config: Any, server_state: Any, app_state: Any, _loop: Any = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        # uvicorn's own check of --limit-concurrency answers in plain text: checked here instead
        self.connection_limit, self.limit_concurrency = self.limit_concurrency, None

    def data_received(self, data: bytes) -> None:
        counted = self.in_head
        super().data_received(data)
        if counted and self.in_head:
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEADER_BYTES:
                self._refuse_head()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.in_head, self.head_bytes = True, 0

    def on_headers_complete(self) -> None:
        self.in_head = False
        limit = self.connection_limit  # counted as uvicorn counts them, this connection included
        over = limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit)
        self.app = _over_the_limit(limit) if over else self.config.loaded_app
        super().on_headers_complete()

    def _refuse_head(self) -> None:
        message = f"The request line and headers are larger than {MAX_HEADER_BYTES} bytes."
        body = json.dumps(APIError(431, message).body()).encode()
        head = (
            "HTTP/1.1 431 Request Header Fields Too Large\r\n"
            "content-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        self.in_head = False
        self.transport.write(head.encode() + body)
        self.transport.close()


def _over_the_limit(limit: int) -> JSONResponse:
    logger.warning("over --limit-concurrency (%d): answered 503", limit)
    message = f"The server is at its limit of {limit} connections and requests; retry shortly."
    return APIError(503, message, headers={"Retry-After": "1"}).response()


def uvicorn_limits(args: argparse.Namespace) -> dict[str, Any]:
    """uvicorn.Config keyword arguments for the connection limits of `args`."""
    return {
        "http": BoundedHttpToolsProtocol if args.http == "httptools" else "h11",
        "h11_max_incomplete_event_size": MAX_HEADER_BYTES,
        "timeout_keep_alive": args.timeout_keep_alive,
        "limit_concurrency": args.limit_concurrency,
        "backlog": args.backlog,
    }
