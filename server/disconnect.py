"""Non-streaming requests whose client leaves: stop their work instead of finishing it.

Starlette keeps running a handler after its client has gone (it notices only when it sends
the response). A worker request awaited through `unless_disconnected` is cancelled instead,
which aborts it in its worker (WorkerClient.call), so that nobody's batch carries it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any, TypeVar

from starlette.requests import Request

from pagoda.server.errors import APIError

T = TypeVar("T")
CLIENT_CLOSED = 499  # nginx's status for it: the access log tells it from a served request


async def unless_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """`await work`, unless the client disconnects first (its body must have been read)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise APIError(CLIENT_CLOSED, "The client closed the connection.")
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
