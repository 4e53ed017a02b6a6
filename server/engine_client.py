"""The frontend's handle on one engine core process: start it, stream requests, watch it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import zmq
import zmq.asyncio

from pagoda.engine.config import EngineConfig
from pagoda.engine.core import decode_delta, encode_params, pack, run_engine_core, unpack
from pagoda.engine.sampling_params import SamplingParams
from pagoda.engine.sequence import SequenceDelta

logger = logging.getLogger(__name__)
WATCH_INTERVAL_S = 0.5


class EngineDeadError(RuntimeError):
    """The engine process is gone: its requests cannot finish."""


class EngineClient:
    def __init__(self, config: EngineConfig, name: str) -> None:
        self.config = config
        self.name = name
        self.info: dict = {}
        self.stats: dict = {"running": 0, "waiting": 0, "kv_cache_usage": 0.0, "num_preemptions": 0}
        self.dead = False
        self._queues: dict[str, asyncio.Queue] = {}
        self._tasks: list[asyncio.Task] = []
        self._process: multiprocessing.Process | None = None
        self._context = zmq.asyncio.Context()
        self._ipc_dir = tempfile.TemporaryDirectory(prefix="pagoda-")

    @property
    def healthy(self) -> bool:
        return not self.dead and self._process is not None and self._process.is_alive()

    @property
    def num_in_flight(self) -> int:
        return len(self._queues)

    @property
    def max_model_len(self) -> int:
        return self.info["max_model_len"]

    async def start(self) -> None:
        folder = Path(self._ipc_dir.name)
        input_addr, output_addr = f"ipc://{folder}/input", f"ipc://{folder}/output"
        self._inbox = self._context.socket(zmq.PUSH)
        self._inbox.bind(input_addr)
        self._outbox = self._context.socket(zmq.PULL)
        self._outbox.bind(output_addr)
        spawn = multiprocessing.get_context("spawn")
        self._process = spawn.Process(
            target=run_engine_core,
            args=(self.config, input_addr, output_addr),
            name=f"pagoda-engine-{self.name}",
            daemon=True,
        )
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
                    f"the engine process for {self.name!r} exited with code "
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
                        queue.put_nowait(decode_delta(fields))
                self.stats = message[2]
            elif kind == "stats":
                self.stats = message[1]
            elif kind == "rejected":
                queue = self._queues.get(message[1])
                if queue is not None:
                    queue.put_nowait(ValueError(message[2]))

    async def _watch_process(self) -> None:
        while self._process.is_alive():
            await asyncio.sleep(WATCH_INTERVAL_S)
        self.dead = True
        logger.error(
            "the engine process for %s died (exit code %s): failing %d in-flight requests",
            self.name,
            self._process.exitcode,
            len(self._queues),
        )
        for queue in self._queues.values():
            queue.put_nowait(EngineDeadError(f"the engine for {self.name!r} stopped"))

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[SequenceDelta]:
        """Stream the request's deltas until all its choices finish. Leaving the iteration
        early (a client that disconnected) aborts the request in the engine at once."""
        if not self.healthy:
            raise EngineDeadError(f"the engine for {self.name!r} is not running")
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        await self._inbox.send(pack(["add", request_id, prompt_token_ids, encode_params(params)]))
        unfinished = params.n
        try:
            while unfinished:
                item = await queue.get()
                if isinstance(item, Exception):
                    unfinished = 0
                    raise item
                if item.finish_reason is not None:
                    unfinished -= 1
                yield item
        finally:
            del self._queues[request_id]
            if unfinished and self.healthy:
                await self.abort([request_id])

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
