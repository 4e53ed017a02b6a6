"""Draining on SIGTERM (or Ctrl-C): the server stops taking work at once but keeps its
socket open, so that a load balancer reads 503 on /health and a new request gets a clear 503
instead of a refused connection; running requests get up to --shutdown-timeout to finish,
the rest end with a 503 (streams: an error event, then [DONE]); then uvicorn exits.

uvicorn's own graceful shutdown closes the listening socket first, which tells a balancer
nothing it can act on before connections fail: hence this gate in front of the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from types import FrameType

import uvicorn
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from pagoda.server.errors import APIError
from pagoda.server.image_store import URL_PATH
from pagoda.server.worker_client import WorkerClient, WorkerDeadError

logger = logging.getLogger("pagoda")
PROBES = ("/health", "/metrics")  # not requests to wait for; /metrics serves on while draining
FLUSH_S = 5.0  # for the requests ended by an error to send it


class ShuttingDown(WorkerDeadError):
    """A request the drain ended: rendered as a 503 like a worker that stopped."""


class DrainGate:
    """ASGI middleware: counts the requests in flight and, once draining, answers the new
    ones (and /health) with 503 and `Connection: close`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.draining = False
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PROBES and not self.draining:
            await self.app(scope, receive, send)
        # draining, the images behind the URLs it gave out still serve: no other server has them
        elif not self.draining or scope["path"].startswith(URL_PATH):
            await self._count(scope, receive, send)
        elif scope["path"] != "/metrics":
            await self._refuse(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _count(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.in_flight += 1
        self.idle.clear()
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self.idle.set()

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == "/health":
            body = {"status": "draining"}
        else:
            body = APIError(503, "The server is shutting down: retry on another one.").body()
        response = JSONResponse(body, status_code=503, headers={"connection": "close"})
        await response(scope, receive, send)


class DrainingServer(uvicorn.Server):
    """uvicorn that drains through a DrainGate on the first SIGTERM/SIGINT; a second signal
    ends what still runs at once."""

    def __init__(
        self,
        config: uvicorn.Config,
        gate: DrainGate,
        clients: Iterable[WorkerClient],
        timeout: float,
    ) -> None:
        super().__init__(config)
        self.gate = gate
        self.clients = clients
        self.timeout = timeout
        self._hurry = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # a signal handler: it runs between two steps of the event loop, on its thread
        if self._loop is None or self.should_exit:
            super().handle_exit(sig, frame)
        elif self.gate.draining:
            self._loop.call_soon_threadsafe(self._hurry.set)
        else:
            self.gate.draining = True
            self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain()))

    async def _drain(self) -> None:
        logger.info(
            "draining: /health and new requests answer 503; %d requests in flight get up to "
            "%.0f s to finish",
            self.gate.in_flight,
            self.timeout,
        )
        if not await _first(self.gate.idle.wait(), self._hurry.wait(), timeout=self.timeout):
            logger.warning("ending %d requests still running with a 503", self.gate.in_flight)
            error = ShuttingDown("The server is shutting down and ended this request.")
            for client in self.clients:
                client.fail_in_flight(error)
            await _first(self.gate.idle.wait(), timeout=FLUSH_S)
        else:
            logger.info("drained: no request in flight")
        self.should_exit = True


async def _first(*waits, timeout: float) -> bool:
    """Whether the first of `waits` (coroutines) finished within `timeout`."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    done, pending = await asyncio.wait(tasks, timeout=timeout, return_when="FIRST_COMPLETED")
    for task in pending:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return tasks[0] in done
