"""The server's handle on one worker process (engine core, embedding or image worker): start
it, send requests, route its outputs to them, watch it. The messages are engine/worker.py's."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from pagoda.engine.worker import pack, unpack
from pagoda.logs import current_settings

logger = logging.getLogger(__name__)
WATCH_INTERVAL_S = 0.5


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    added = [name for name in values if name not in os.environ]
    os.environ.update({name: values[name] for name in added})
    try:
        yield
    finally:
        for name in added:
            del os.environ[name]


class WorkerDeadError(RuntimeError):
    """The worker process is gone: its requests cannot finish."""


class RequestRejected(ValueError):
    """The worker refused the request (bad input): a 400 with the worker's code and param."""

    def __init__(self, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.param = param


class WorkerClient:
    """Subclasses name their `kind`, decode their outputs and say what a request sends."""

    kind = "worker"
    # environment variables the worker process starts with, unless already set
    environment: dict[str, str] = {}

    def __init__(self, name: str, target: Callable[..., None], args: tuple) -> None:
        """`target(*args, input_addr, output_addr, log_settings)` runs in the spawned
        process (log_settings: this process's, so that every worker logs alike)."""
        self.name = name
        self.info: dict = {}
        self.stats: dict = {}
        self.dead = False
        self._target = target
        self._args = args
        self._queues: dict[str, asyncio.Queue] = {}
        self._tasks: list[asyncio.Task] = []
        self._process: multiprocessing.Process | None = None
        self._context = zmq.asyncio.Context()
        self._ipc_dir = tempfile.TemporaryDirectory(prefix="pagoda-")

    def decode_output(self, fields: list) -> Any:
        """One output of an "outputs" message (its first field is the request id)."""
        return fields

    @property
    def healthy(self) -> bool:
        return not self.dead and self._process is not None and self._process.is_alive()

    @property
    def num_in_flight(self) -> int:
        return len(self._queues)

    async def start(self) -> None:
        folder = Path(self._ipc_dir.name)
        input_addr, output_addr = f"ipc://{folder}/input", f"ipc://{folder}/output"
        self._inbox = self._context.socket(zmq.PUSH)
        self._inbox.bind(input_addr)
        self._outbox = self._context.socket(zmq.PULL)
        self._outbox.bind(output_addr)
        spawn = multiprocessing.get_context("spawn")
        self._process = spawn.Process(
            target=self._target,
            args=(*self._args, input_addr, output_addr, current_settings()),
            name=f"pagoda-{self.kind}-{self.name}",
            daemon=True,
        )
        with _environment(self.environment):  # a spawned process copies this one's
            self._process.start()
        self.info = await self._wait_ready()
        self._tasks = [
            asyncio.create_task(self._read_outputs()),
            asyncio.create_task(self._watch_process()),
        ]

    async def _wait_ready(self) -> dict:
        while True:
            if await self._outbox.poll(int(WATCH_INTERVAL_S * 1000)):
                message = unpack(await self._outbox.recv())
                if message[0] == "ready":
                    return message[1]
                if message[0] == "failed":
                    raise RuntimeError(f"model {self.name!r} failed to load: {message[1]}")
            elif not self._process.is_alive():
                raise RuntimeError(
                    f"the {self.kind} process for {self.name!r} exited with code "
                    f"{self._process.exitcode} while loading"
                )

    async def _read_outputs(self) -> None:
        while True:
            message = unpack(await self._outbox.recv())
            kind = message[0]
            if kind == "outputs":
                for fields in message[1]:
                    queue = self._queues.get(fields[0])
                    if queue is not None:
                        queue.put_nowait(self.decode_output(fields))
                self.stats = message[2]
            elif kind == "stats":
                self.stats = message[1]
            elif kind == "rejected":
                queue = self._queues.get(message[1])
                if queue is not None:
                    queue.put_nowait(RequestRejected(*message[2:]))

    async def _watch_process(self) -> None:
        while self._process.is_alive():
            await asyncio.sleep(WATCH_INTERVAL_S)
        self.dead = True
        logger.error(
            "the %s process for %s died (exit code %s): failing %d in-flight requests",
            self.kind,
            self.name,
            self._process.exitcode,
            len(self._queues),
        )
        for queue in self._queues.values():
            queue.put_nowait(WorkerDeadError(f"the {self.kind} for {self.name!r} stopped"))

    async def stream(
        self, request_id: str, payload: list, finished: Callable[[Any], bool]
    ) -> AsyncIterator[Any]:
        """Send ["add", request_id, *payload] and yield the request's outputs until
        `finished(output)`. Leaving the iteration early (a client that disconnected) aborts
        the request in the worker at once."""
        if not self.healthy:
            raise WorkerDeadError(f"the {self.kind} for {self.name!r} is not running")
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        done = False
        try:
            await self._inbox.send(pack(["add", request_id, *payload]))
            while not done:
                item = await queue.get()
                if isinstance(item, Exception):
                    done = True
                    raise item
                done = finished(item)
                yield item
        finally:
            del self._queues[request_id]
            if not done and self.healthy:
                await self.abort([request_id])

    async def call(self, request_id: str, payload: list) -> Any:
        """A request answered by one output. Cancelling the call aborts the request."""
        stream = self.stream(request_id, payload, lambda _: True)
        try:
            return await anext(stream)
        finally:
            await stream.aclose()

    async def abort(self, request_ids: list[str]) -> None:
        await self._inbox.send(pack(["abort", request_ids]))

    async def shutdown(self, timeout: float = 10.0) -> None:
        for task in self._tasks:
            task.cancel()
        if self._process is not None and self._process.is_alive():
            # bounded: a process that exits meanwhile (one that failed to load) takes its
            # connection along, and a PUSH without a peer waits for one forever
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._inbox.send(pack(["shutdown"])), timeout)
            await asyncio.to_thread(self._process.join, timeout)
            if self._process.is_alive():
                self._process.kill()
        self._context.destroy(linger=0)
        self._ipc_dir.cleanup()
