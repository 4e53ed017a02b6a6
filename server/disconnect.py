"""Non-streaming requests whose client leaves: stop their work instead of finishing it.

Starlette keeps running a handler after its client has gone (it notices only when it sends
the response). A worker request awaited through `unless_disconnected` is cancelled instead,
which aborts it in its worker (WorkerClient.call), so that nobody's batch carries it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from starlette.requests import Request

from pagoda.server.errors import APIError

T = TypeVar("T")
CLIENT_CLOSED = 499  # nginx's status for it: the access log tells it from a served request


async def unless_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """`await work`, unless the client disconnects first (its body must have been read).

    `work` runs in the handler's own task, which a watcher cancels when the client leaves: no
    task and no `asyncio.wait` of its own per request (the frontend is one thread)."""
    handler = asyncio.current_task()
    assert handler is not None
    awaiting = True

    def on_disconnect(watch: asyncio.Task) -> None:
        # scheduled, not called, when the watch ends: it may run after `work` has returned
        if awaiting and not watch.cancelled():
            handler.cancel()

    watch = asyncio.ensure_future(_disconnected(request))
    watch.add_done_callback(on_disconnect)
    try:
        return await work
    except asyncio.CancelledError:
        if watch.done() and not watch.cancelled():  # the client left; nobody else cancelled
            handler.uncancel()
            raise APIError(CLIENT_CLOSED, "The client closed the connection.") from None
        raise
    finally:
        awaiting = False
        watch.cancel()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
