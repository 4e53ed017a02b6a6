"""A worker process fed over ZeroMQ: the loop every worker kind shares (the engine core of a
chat model, the embedding and image workers), so that the server supervises them alike.

The server PUSHes to `input_addr`; the worker PUSHes to `output_addr`. Messages are
msgpack-encoded lists whose first element names them:

    server -> worker   ["add", request_id, *payload]   the payload is the worker kind's own
                       ["abort", [request_id, ...]]
                       ["finish", request_id, index]   one choice of a request ends (the
                                                engine core's); answered by "outputs"
                       ["control", request_id, method, *args]  an operator's change to the
                                                running worker (the engine core's load_lora,
                                                unload_lora); answered by "accepted" or
                                                "rejected"
                       ["shutdown"]
    worker -> server   ["ready", info]          once the model is loaded
                       ["failed", message]      the model could not be loaded
                       ["outputs", [output, ...], stats]   after every step that has outputs
                                                (and at least every STATS_INTERVAL_S while
                                                busy); each output is a list whose first
                                                element is its request id
                       ["rejected", request_id, message, code, param]  an add that failed
                                                validation (code and param as in OpenAI's
                                                error body, or None)
                       ["accepted", request_id] an add that passed, from a worker whose
                                                `acknowledges_adds` is true (image requests:
                                                a stream's 200 waits for it)
                       ["error", request_id, message]   a request whose batch failed
                                                (the worker goes on; the server answers 500)
                       ["stats", stats]         while idle, every STATS_INTERVAL_S
"""

from __future__ import annotations

import ctypes
import gc
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack
import zmq

from pagoda.engine.cpu_threads import ThreadGovernor
from pagoda.logs import LogSettings, describe_error, setup_logging

logger = logging.getLogger(__name__)
STATS_INTERVAL_S = 1.0
# glibc's mallopt parameters
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
KEEP_FREED_BYTES = 1 << 30


def pack(message: list) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpack(data: bytes) -> list:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


class Rejected(ValueError):
    """A request the worker refuses, with the OpenAI error `code` and `param` to report."""

    def __init__(self, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.param = param


class Worker(Protocol):
    """What the loop drives. `add` raises ValueError (or Rejected) for a request it refuses."""

    governor: ThreadGovernor | None  # ticked every loop turn, busy or idle

    def info(self) -> dict: ...

    def add(self, request_id: str, *payload: Any) -> None: ...

    def abort(self, request_ids: list[str]) -> None: ...

    def has_work(self) -> bool: ...

    def step(self) -> list[list]: ...

    def stats(self) -> dict: ...

    def take_rejected(self) -> list[tuple[str, str]]:
        """Requests refused after their add (request id, message): the engine core's whose
        grammar failed to compile in the background."""
        ...

    # optional: take_failed() -> [(request id, message)], requests whose batch failed;
    # close(), called once the server said shutdown (the engine core stops its ranks);
    # finish(request_id, index) -> outputs, and control(method, *args), the engine core's


def run_worker(
    load: Callable[[], Worker],
    input_addr: str,
    output_addr: str,
    log_settings: LogSettings,
    model_in_thread: bool = False,
) -> None:
    """Process entry point. Ctrl-C and SIGTERM go to the server, which drains and says
    shutdown: a signal sent to the server's whole process group (a terminal's Ctrl-C, systemd's
    default KillMode=control-group, `kill -TERM -PGID`) must not end a worker while its requests
    drain. `model_in_thread`: the worker runs its model in a thread of its own (see
    keep_freed_memory)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    setup_logging(log_settings)
    keep_freed_memory(one_arena=model_in_thread)  # before any thread starts
    exit_with_server()
    context = zmq.Context()
    inbox = context.socket(zmq.PULL)
    inbox.connect(input_addr)
    outbox = context.socket(zmq.PUSH)
    outbox.connect(output_addr)
    try:
        worker = load()
    except Exception as exc:  # reported to the server, which fails its start-up with it
        outbox.send(pack(["failed", describe_error(exc)]))
        # A worker's process ends in os._exit, which drops what ZeroMQ has not sent yet: the
        # server would wait for a message that never comes. Deliver it first.
        context.destroy(linger=10_000)
        return
    freeze_heap()
    release_freed_memory()
    outbox.send(pack(["ready", worker.info()]))
    try:
        _busy_loop(worker, inbox, outbox)
    except Exception:
        # through the logging setup (one JSON object a line with --log-format json), not as
        # multiprocessing's raw traceback on stderr; the server restarts the process
        logger.exception("the worker failed; its process ends")
        sys.exit(1)
    close = getattr(worker, "close", None)
    if close is not None:
        close()
    context.destroy(linger=1000)


def check_cuda_through_nvml() -> None:
    """Have torch ask NVML, not the CUDA runtime, whether CUDA is there, in this process and
    those it starts. A module may ask as it is imported (xgrammar's tvm_ffi does); asked
    through the runtime, that poisons every fork of the process that asked for CUDA (a GPU
    worker failed to load: "Cannot re-initialize CUDA in forked subprocess")."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")


def exit_with_server() -> None:
    """End this process as soon as the server's ends: a server killed (the OOM killer, a
    SIGKILL), or stopped while its models load, leaves no worker behind holding a GPU (nor a
    tensor-parallel rank: its parent is its engine core). A thread waits on the parent's
    sentinel, which turns readable when it ends, even if it ended before. (The kernel's
    PR_SET_PDEATHSIG would follow the forkserver, whose end waits for its workers' own.)"""
    server = multiprocessing.parent_process()
    if server is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([server.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="pagoda-exit-with-server", daemon=True).start()


def keep_freed_memory(one_arena: bool = False) -> bool:
    """Make glibc keep the memory a step frees for the next step, below 1 GiB a block.

    By default glibc hands large freed blocks back to the kernel (those it mmapped, and the
    heap's top above 128 KiB), so the next step's tensors land on fresh pages that fault in and
    are zeroed: 3,500 page faults per 256x256 image of the tiny FLUX pipeline, several ms.
    How many depends on what the process freed before (glibc raises its mmap threshold as it
    sees large blocks freed), which made one pipeline run at different speeds in two processes.
    Fixed thresholds end both: a worker's resident memory stays at its peak.

    The thresholds hold in the main arena only. A thread's first allocation gets an arena of
    its own, made of heaps of at most 64 MiB, and a larger block is mmapped afresh each time
    whatever the threshold: the image worker's pipeline runs in a thread, and a 512x512 image
    faulted 2,000 pages in (its VAE's activations), 6-20% of its time. `one_arena` puts every
    thread in the main arena, which ends that; call it before the process starts threads. Only
    for a model run in a thread: where the model runs in the main thread, its OpenMP threads
    would share the one arena's lock for nothing (a chat engine served 12-16% fewer tokens/s
    so, in two alternated runs). False where the C library is not glibc."""
    libc = _glibc()
    if libc is None:
        return False
    settings = [(M_MMAP_THRESHOLD, KEEP_FREED_BYTES), (M_TRIM_THRESHOLD, KEEP_FREED_BYTES)]
    if one_arena:
        settings.append((M_ARENA_MAX, 1))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)


def freeze_heap() -> None:
    """Collect what loading left behind, then take every object alive (the model, its
    tokenizers, the modules imported) out of the garbage collector's sight for good. A full
    collection walks every tracked object: in the frontend, one stalled the event loop, and
    every stream with it, for 219 ms during a 10 s run at 32 concurrent streams (vLLM's server
    freezes its start-up heap too). Call it once loading is done."""
    gc.collect()
    gc.freeze()


def release_freed_memory() -> bool:
    """Hand what the process has freed so far back to the kernel (glibc's malloc_trim), once its
    model is loaded: under keep_freed_memory's thresholds, what the load freed would stay
    resident for good (the fp32 weights that the bf16 CPU path packs and drops: 230 MB of
    SmolLM2-135M's engine). False where the C library is not glibc."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def _glibc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


@dataclass(slots=True)
class BatchGather:
    """Whether a worker's next batch starts now, or waits a little for more requests.

    Clients answered by one batch send their next requests one by one, a few milliseconds
    apart. Started at once, the next batch would take the first of them alone and leave the
    others to wait a whole batch behind it, so that batches alternate between partial sizes.
    So when fewer requests wait than the last batch served, the batch waits for them: at most
    `max_s`, and at most `share` of the last batch's run time. A single client (a last batch
    of one request) never waits."""

    max_s: float = 0.02
    share: float = 0.25
    poll_s: float = 0.001  # how long a step that holds its batch back sleeps
    last_size: int = 0  # requests the last batch served
    last_seconds: float = 0.0
    deadline: float | None = None

    def ready(self, waiting: int) -> bool:
        if waiting >= self.last_size:
            self.deadline = None
            return True
        now = time.monotonic()
        if self.deadline is None:
            self.deadline = now + min(self.max_s, self.share * self.last_seconds)
        if now < self.deadline:
            return False
        self.deadline = None
        return True

    def ran(self, size: int, seconds: float) -> None:
        self.last_size, self.last_seconds = size, seconds


def _busy_loop(worker: Worker, inbox: zmq.Socket, outbox: zmq.Socket) -> None:
    last_stats = 0.0
    while True:
        if worker.governor is not None:
            worker.governor.tick()
        timeout_ms = 0 if worker.has_work() else int(STATS_INTERVAL_S * 1000)
        # everything that arrived goes in before the next step, so that it batches with it
        while inbox.poll(timeout_ms):
            if not _handle(worker, unpack(inbox.recv()), outbox):
                return
            timeout_ms = 0
        if worker.has_work():
            outputs = worker.step()
            # a step without outputs (an image batch still running) says nothing: waking the
            # server for it costs the batch CPU time
            if outputs or time.monotonic() - last_stats >= STATS_INTERVAL_S:
                outbox.send(pack(["outputs", outputs, worker.stats()]))
                last_stats = time.monotonic()
            for request_id, message in worker.take_rejected():
                outbox.send(pack(["rejected", request_id, message, None, None]))
            for request_id, message in getattr(worker, "take_failed", list)():
                outbox.send(pack(["error", request_id, message]))
        elif time.monotonic() - last_stats >= STATS_INTERVAL_S:
            outbox.send(pack(["stats", worker.stats()]))
            last_stats = time.monotonic()


def _handle(worker: Worker, message: list, outbox: zmq.Socket) -> bool:
    kind = message[0]
    if kind == "add":
        request_id = message[1]
        try:
            worker.add(request_id, *message[2:])
        except ValueError as exc:
            code, param = getattr(exc, "code", None), getattr(exc, "param", None)
            outbox.send(pack(["rejected", request_id, str(exc), code, param]))
        else:
            if getattr(worker, "acknowledges_adds", False):
                outbox.send(pack(["accepted", request_id]))
    elif kind == "control":
        request_id = message[1]
        try:
            worker.control(*message[2:])
        except ValueError as exc:
            outbox.send(pack(["rejected", request_id, str(exc), None, None]))
        else:
            outbox.send(pack(["accepted", request_id]))
    elif kind == "abort":
        worker.abort(message[1])
    elif kind == "finish":
        outputs = worker.finish(message[1], message[2])
        if outputs:
            outbox.send(pack(["outputs", outputs, worker.stats()]))
    elif kind == "shutdown":
        return False
    return True
