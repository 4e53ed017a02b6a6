"""The server's handle on one worker process (engine core, embedding or image worker): start
it, send requests, route its outputs to them, and supervise it: a process that dies fails its
in-flight requests at once and is started again after a bounded backoff. The messages are
engine/worker.py's."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import signal
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from pagoda.engine.worker import pack, unpack
from pagoda.logs import current_settings
from pagoda.server import defaults
from pagoda.server.errors import APIError

logger = logging.getLogger(__name__)
# Workers fork from multiprocessing's forkserver, which `pagoda serve` forks from itself as it
# starts (server/forkserver.py); started here instead, it would import nothing first.
_processes = multiprocessing.get_context("forkserver")
LOAD_POLL_S = 0.5
RESTART_BACKOFF_S = 1.0  # the first restart's delay, doubled after each crash in a row
MAX_RESTART_BACKOFF_S = 30.0
STABLE_S = 60.0  # a process that served this long has not crashed "in a row"
_max_failed_starts = defaults.MAX_FAILED_STARTS


def set_max_failed_starts(count: int) -> None:
    """`pagoda serve --max-failed-starts`, for every worker."""
    global _max_failed_starts
    _max_failed_starts = count


class WorkerDeadError(RuntimeError):
    """The worker process is gone: its requests cannot finish."""


class RequestRejected(ValueError):
    """The worker refused the request (bad input): a 400 with the worker's code and param."""

    def __init__(self, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.param = param


ACCEPTED = "accepted"  # in a request's outputs: the worker took it (see engine/worker.py)


class WorkerClient:
    """Subclasses name their `kind`, decode their outputs and say what a request sends.

    `state` is "starting", "ready", "restarting" (the process died; a new one is on its
    way), "failed" (it kept failing to start: given up) or "stopped"; `reason` says why a
    worker is not ready."""

    kind = "worker"
    # the keys of `stats` that describe what the process holds now: a dead one holds nothing
    load_gauges: tuple[str, ...] = ("running", "waiting")

    def __init__(self, name: str, target: Callable[..., None], args: tuple) -> None:
        """`target(*args, input_addr, output_addr, log_settings)` runs in the worker's
        process (log_settings: this process's, so that every worker logs alike)."""
        self.name = name
        self.info: dict = {}
        self.stats: dict = {}
        self.state = "starting"
        self.reason: str | None = None
        self.restarts = 0
        self._target = target
        self._args = args
        self._queues: dict[str, asyncio.Queue] = {}
        self._reader: asyncio.Task | None = None
        self._supervisor: asyncio.Task | None = None
        self._died: asyncio.Future | None = None  # the current process's end
        self._process: multiprocessing.Process | None = None
        self._started_at = 0.0
        self._generation = 0
        self._context = zmq.asyncio.Context()
        self._ipc_dir = tempfile.TemporaryDirectory(prefix="pagoda-")

    def decode_output(self, fields: list) -> Any:
        """One output of an "outputs" message (its first field is the request id)."""
        return fields

    @property
    def healthy(self) -> bool:
        return self.state == "ready" and self._process.is_alive()

    @property
    def num_in_flight(self) -> int:
        return len(self._queues)

    def health(self) -> dict:
        """The worker's line in /health."""
        pid = self._process.pid if self.healthy else None
        return {"status": self.state, "reason": self.reason, "restarts": self.restarts, "pid": pid}

    async def start(self) -> None:
        """The first start: a failure is the caller's (the server does not come up)."""
        await self._spawn()
        self._supervisor = asyncio.create_task(self._supervise())

    async def _spawn(self) -> None:
        # fresh sockets for every process: nothing queued for a dead one reaches the next
        self._generation += 1
        folder, n = Path(self._ipc_dir.name), self._generation
        input_addr, output_addr = f"ipc://{folder}/input-{n}", f"ipc://{folder}/output-{n}"
        self._inbox = self._context.socket(zmq.PUSH)
        self._inbox.bind(input_addr)
        self._outbox = self._context.socket(zmq.PULL)
        self._outbox.bind(output_addr)
        self._process = _processes.Process(
            target=self._target,
            args=(*self._args, input_addr, output_addr, current_settings()),
            name=f"pagoda-{self.kind}-{self.name}",
            daemon=True,
        )
        self._process.start()
        self._died = asyncio.get_running_loop().create_future()
        try:
            self.info = await self._wait_ready()
        except RuntimeError:  # it failed to load, and exits by itself
            await self._stop_process(timeout=5.0)
            raise
        except BaseException:
            # stopped while loading (a signal, another model's failure): the worker reads no
            # message until it has loaded, so asking it to exit only waited out the timeout
            # (a Ctrl-C during a load took 5-10 s)
            await self._stop_process(timeout=0)
            raise
        self._reader = asyncio.create_task(self._read_outputs())
        self._started_at = time.monotonic()
        self.state, self.reason = "ready", None

    async def _wait_ready(self) -> dict:
        while True:
            if await self._outbox.poll(int(LOAD_POLL_S * 1000)):
                message = unpack(await self._outbox.recv())
                if message[0] == "ready":
                    return message[1]
                if message[0] == "failed":
                    raise RuntimeError(f"model {self.name!r} failed to load: {message[1]}")
            elif not self._process.is_alive():
                raise RuntimeError(
                    f"the {self.kind} process for {self.name!r} {_exit(self._process)} "
                    "while loading"
                )

    async def _read_outputs(self) -> None:
        # pyzmq's asyncio recv makes a future and re-arms the event loop's watch on the socket
        # for every message: a sixth of this process's busy time (py-spy) while one stream
        # runs. Instead the loop watches the socket's descriptor for good, and each wake takes
        # every message that came, without blocking. `get(zmq.EVENTS)` is the plain int:
        # the `socket.EVENTS` attribute wraps it in an enum (2.0 against 5.1 us a read).
        socket = zmq.Socket.shadow(self._outbox.underlying)
        readable = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_reader(socket.FD, readable.set)
        try:
            while True:
                # the descriptor signals a change only: drain before waiting on it again
                while socket.get(zmq.EVENTS) & zmq.POLLIN:
                    self._dispatch(unpack(socket.recv(zmq.NOBLOCK)))
                readable.clear()
                if not socket.get(zmq.EVENTS) & zmq.POLLIN:
                    await readable.wait()
        finally:
            loop.remove_reader(socket.FD)

    def _dispatch(self, message: list) -> None:
        kind = message[0]
        if kind == "outputs":
            for fields in message[1]:
                queue = self._queues.get(fields[0])
                if queue is not None:
                    queue.put_nowait(self._decode(fields))
            self.stats = message[2]
        elif kind == "stats":
            self.stats = message[1]
        elif kind == "accepted":
            queue = self._queues.get(message[1])
            if queue is not None:
                queue.put_nowait(ACCEPTED)
        elif kind == "rejected":
            queue = self._queues.get(message[1])
            if queue is not None:
                queue.put_nowait(RequestRejected(*message[2:]))
        elif kind == "error":
            queue = self._queues.get(message[1])
            if queue is not None:
                logger.error("%s: %s", self.name, message[2])
                queue.put_nowait(APIError(500, message[2]))

    def _decode(self, fields: list) -> Any:
        """The output, or the error that fails its request: an output the server cannot read
        (from a worker of another version) must not end the reader, which every request of
        this worker waits on; the reader dying left them all waiting for good."""
        try:
            return self.decode_output(fields)
        except Exception as exc:
            logger.exception(
                "%s: an output from the %s that the server cannot read", self.name, self.kind
            )
            return APIError(
                500,
                f"the {self.kind} for {self.name!r} sent an output the server cannot read: {exc}",
            )

    async def _supervise(self) -> None:
        crashes = 0
        while True:
            await _exited(self._process)
            await asyncio.to_thread(self._process.join)  # reaped: its exit code is known
            self._died.set_result(None)  # sends waiting for it give up
            self.reason = f"the {self.kind} process {_exit(self._process)}"
            self.state = "restarting"
            logger.error(
                "%s: %s: failing %d in-flight requests",
                self.name,
                self.reason,
                len(self._queues),
            )
            self.fail_in_flight(WorkerDeadError(f"the {self.kind} for {self.name!r} stopped"))
            self.stats = {**self.stats, **dict.fromkeys(self.load_gauges, 0)}
            await self._stop_process(timeout=0)
            crashes = 1 if time.monotonic() - self._started_at >= STABLE_S else crashes + 1
            if not await self._restart(crashes):
                return

    async def _restart(self, crashes: int) -> bool:
        """Start a new process after a backoff; False once it failed max_failed_starts times."""
        for attempt in range(1, _max_failed_starts + 1):
            delay = min(MAX_RESTART_BACKOFF_S, RESTART_BACKOFF_S * 2 ** (crashes + attempt - 2))
            logger.warning(
                "%s: restarting the %s process in %.1f s (attempt %d of %d)",
                self.name,
                self.kind,
                delay,
                attempt,
                _max_failed_starts,
            )
            await asyncio.sleep(delay)
            try:
                await self._spawn()
            except Exception as exc:
                self.reason = str(exc)
                logger.error("%s: restart attempt %d failed: %s", self.name, attempt, exc)
                continue
            self.restarts += 1
            logger.info("%s: the %s process is serving again", self.name, self.kind)
            return True
        self.state = "failed"
        logger.error(
            "%s: giving up on the %s process after %d failed starts in a row (last: %s); "
            "the model answers 503 until the server restarts, the other models serve on",
            self.name,
            self.kind,
            _max_failed_starts,
            self.reason,
        )
        return False

    def fail_in_flight(self, error: Exception) -> None:
        """End every in-flight request with `error` (a stream then ends with an error event)."""
        for queue in self._queues.values():
            queue.put_nowait(error)

    async def stream(
        self, request_id: str, payload: list, finished: Callable[[Any], bool]
    ) -> AsyncIterator[Any]:
        """Send ["add", request_id, *payload] and yield the request's outputs until
        `finished(output)`. Leaving the iteration early (a client that disconnected) aborts
        the request in the worker at once."""
        self._check_running()
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        done = False
        try:
            await self._send(["add", request_id, *payload])
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

    def _check_running(self) -> None:
        if not self.healthy:
            why = f" ({self.reason})" if self.reason else ""
            raise WorkerDeadError(f"the {self.kind} for {self.name!r} is not running{why}")

    async def control(self, method: str, *args: Any) -> None:
        """An operator's change to the running worker (engine/worker.py's "control"): returns
        once the worker made it; raises RequestRejected where it refused."""
        self._check_running()
        request_id = f"control-{uuid.uuid4().hex}"
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        try:
            await self._send(["control", request_id, method, *args])
            answer = await queue.get()
        finally:
            del self._queues[request_id]
        if isinstance(answer, Exception):
            raise answer

    async def call(self, request_id: str, payload: list) -> Any:
        """A request answered by one output. Cancelling the call aborts the request."""
        stream = self.stream(request_id, payload, lambda _: True)
        try:
            return await anext(stream)
        finally:
            await stream.aclose()

    async def abort(self, request_ids: list[str]) -> None:
        with contextlib.suppress(WorkerDeadError):  # a dead process has nothing to abort
            await self._send(["abort", request_ids])

    async def _send(self, message: list) -> None:
        """Send, unless the process dies first: a PUSH whose peer is gone waits forever."""
        sending = self._inbox.send(pack(message))
        if sending.done():  # queued at once, as nearly always: no wait to set up
            sending.result()
            return
        try:
            await asyncio.wait({sending, self._died}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not sending.done():
                sending.cancel()
        if sending.cancelled():
            raise WorkerDeadError(f"the {self.kind} for {self.name!r} stopped")
        sending.result()

    async def _stop_process(self, timeout: float) -> None:
        """Ask the process to exit (up to `timeout`), kill it if it does not, close its
        sockets."""
        if self._reader is not None:
            self._reader.cancel()
        if self._process.is_alive() and timeout > 0:
            # bounded: a process that exits meanwhile (one that failed to load) takes its
            # connection along, and a PUSH without a peer waits for one forever
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._inbox.send(pack(["shutdown"])), timeout)
            await asyncio.to_thread(self._process.join, timeout)
        if self._process.is_alive():
            self._process.kill()
        await asyncio.to_thread(self._process.join)
        if not self._died.done():
            self._died.set_result(None)
        self._inbox.close(linger=0)
        self._outbox.close(linger=0)

    async def shutdown(self, timeout: float = 10.0) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        if self._process is not None and self.state != "failed":
            await self._stop_process(timeout)
        self.state = "stopped"
        self._context.destroy(linger=0)
        self._ipc_dir.cleanup()


async def start_side_by_side(starts: list[Awaitable[Any]]) -> list[Any]:
    """Await every start at once; on the first failure cancel the others and raise it. Left
    running (asyncio.gather's way), a worker still loading went on to its "ready" after the
    caller had stopped it, and its supervisor took the stop for a crash and restarted it."""
    tasks = [asyncio.ensure_future(start) for start in starts]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()  # a worker still loading stops its process (WorkerClient._spawn)
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _exited(process: multiprocessing.Process) -> None:
    """Returns as soon as the process ends: its sentinel turns readable (no polling)."""
    loop = asyncio.get_running_loop()
    exited = loop.create_future()
    loop.add_reader(process.sentinel, lambda: exited.done() or exited.set_result(None))
    try:
        await exited
    finally:
        loop.remove_reader(process.sentinel)


def _exit(process: multiprocessing.Process) -> str:
    """How a process ended, in words: "was killed by SIGKILL", "exited with code 1"."""
    code = process.exitcode
    if code is not None and code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"
