"""Background responses (`background: true`): the response's events are made by a task of its
own, so that the request that started it may leave; any client may follow them, from any
point, until the response ends (`GET /v1/responses/{id}?stream=true&starting_after=N`), and
`POST /v1/responses/{id}/cancel` ends it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

logger = logging.getLogger("pagoda")


class BackgroundRun:
    def __init__(self, events: AsyncIterator[dict], on_cancel: Callable[[], None]) -> None:
        self.events: list[dict] = []  # all of them, in order: an event's index is its number
        self.ended = False
        self._on_cancel = on_cancel
        self._news = asyncio.Event()  # set, and replaced, at each new event and at the end
        self._task = asyncio.get_running_loop().create_task(self._drive(events))

    async def _drive(self, events: AsyncIterator[dict]) -> None:
        try:
            async with aclosing(events):
                async for event in events:
                    self.events.append(event)
                    self._wake()
        except asyncio.CancelledError:
            return  # cancel() ends the run: the task may be cancelled before it ever ran
        except Exception:  # a bug: the followers and the request must not wait forever
            logger.exception("a background response's run failed")
        self._end()

    def _wake(self) -> None:
        self._news.set()
        self._news = asyncio.Event()

    def _end(self) -> None:
        self.ended = True
        self._wake()

    async def follow(self, after: int = -1) -> AsyncIterator[dict]:
        """The events numbered above `after`, as they come, until the run ends."""
        sent = after + 1
        while True:
            news = self._news  # before yielding: an event added meanwhile sets this one
            while sent < len(self.events):
                yield self.events[sent]
                sent += 1
            if self.ended:
                return
            await news.wait()

    async def cancel(self) -> None:
        """End the run where it is (its generation aborted); on_cancel tells the response."""
        if self.ended:
            return
        self._task.cancel()
        await asyncio.wait([self._task])
        self._on_cancel()
        self._end()

    async def wait(self) -> None:
        """Until the run has ended: the request that started it lasts as long (the drain and
        the key's billing wait for it). Cancelled, it cancels the run: the server is exiting."""
        try:
            await asyncio.wait([self._task])
        except asyncio.CancelledError:
            self._task.cancel()
            raise
        while not self.ended:  # cancel() ends it once the task is done
            await self._news.wait()
