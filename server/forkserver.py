"""The process every worker of `pagoda serve` forks from: multiprocessing's forkserver, itself a
fork of the server taken once the server has imported what both need.

    pagoda serve ── imports torch, transformers ── fork ─┬─ imports its own (uvicorn, ...)
                                                         └─ forkserver: imports the workers'
                                                            modules, then forks each worker

multiprocessing would spawn its forkserver as a new interpreter, which imported torch and
transformers a second time beside the server (4-5 s of CPU at every start on two cores).
Forked, it starts with them, and each side imports only its own after the fork, on its own
core. It is multiprocessing's own forkserver loop (`multiprocessing.forkserver.main`) and wire
protocol, started by `os.fork` instead of `spawnv_passfds`; a Python whose protocol differs
from the one this knows gets the spawned forkserver instead."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import multiprocessing.connection
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import multiprocessing.util
import os
import signal
import socket
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn

# what the server imports in any case and every worker needs, imported before the fork: the
# engine modules the server uses (they import torch, transformers' config and tokenizer classes,
# xgrammar), and what transformers imports on reading a model's config (accelerate,
# torch.distributed.tensor, sympy: 1.5 s), which the server does as it loads its tokenizers.
SHARED_IMPORTS = (
    "pagoda.engine.loader",
    "pagoda.engine.structured_output",
    "pagoda.engine.worker",
    "transformers.activations",
)
# what each kind of worker imports, for the forkserver to import after the fork: the module of
# its process entry point (tests/test_cli.py checks them), then the heavy modules that it imports
# only in the worker (the server imports the entry points, and has no use for these).
WORKER_IMPORTS = {
    "chat": ("pagoda.engine.core", "pagoda.engine.llm_engine"),
    "embedding": (
        "pagoda.engine.embedding_worker",
        "pagoda.engine.embedding_bf16",
        "sentence_transformers",
    ),
    "rerank": (
        "pagoda.engine.cross_encoder_worker",
        "pagoda.engine.embedding_worker",
        "sentence_transformers",
    ),
    "image": ("pagoda.engine.image_worker", "diffusers"),
}
# multiprocessing.forkserver.main's parameters in Python 3.10-3.13 (3.14 adds an auth key)
_KNOWN_PROTOCOL = ("listener_fd", "alive_r", "preload", "main_path", "sys_path")


def start(kinds: set[str], release: Callable[[], None]) -> None:
    """Import SHARED_IMPORTS here, then fork the forkserver, which imports the workers' modules
    of `kinds` (those of the models served). `release`, called in the fork, lets go of what is
    the server's alone (its socket), so that no worker holds it.
    The server is one thread here (with numpy's idle BLAS pool, which the forkserver has too),
    and no CUDA context: its forks are safe."""
    from pagoda.engine.worker import check_cuda_through_nvml  # torch: imported here, not in the CLI

    check_cuda_through_nvml()
    preload = [*SHARED_IMPORTS, *(m for kind in sorted(kinds) for m in WORKER_IMPORTS[kind])]
    # multiprocessing spawns a new forkserver with these if this one dies
    multiprocessing.forkserver.set_forkserver_preload(preload)
    # The forkserver ignores SIGTERM (and so do the workers it forks, which inherit it), as it
    # ignores SIGINT: a SIGTERM sent to the server's whole process group (systemd's default
    # KillMode=control-group, `kill -TERM -PGID`) ended it, and with it the server's view of every
    # worker (each one's end is read from the forkserver), so that the drain failed the requests
    # in flight instead of finishing them. The server stops both itself.
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        if tuple(inspect.signature(multiprocessing.forkserver.main).parameters) != _KNOWN_PROTOCOL:
            multiprocessing.forkserver.ensure_running()
            return
        for module in SHARED_IMPORTS:
            importlib.import_module(module)
        _fork(preload, release)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fork(preload: list[str], release: Callable[[], None]) -> None:
    """What `ForkServer.ensure_running` does, with a fork where it spawns."""
    multiprocessing.resource_tracker.ensure_running()
    address = multiprocessing.connection.arbitrary_address("AF_UNIX")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(address)
        if not multiprocessing.util.is_abstract_socket_namespace(address):
            os.chmod(address, 0o600)
        listener.listen()
        # every process that may ask for a worker holds the write end of this pipe: when all of
        # them have ended, the read end turns readable and the forkserver exits
        alive_r, alive_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(alive_w)
            _run(listener.fileno(), alive_r, preload, release)
        os.close(alive_r)
    server = multiprocessing.forkserver._forkserver
    server._forkserver_address = address
    server._forkserver_alive_fd = alive_w
    server._forkserver_pid = pid


def _run(
    listener_fd: int, alive_r: int, preload: list[str], release: Callable[[], None]
) -> NoReturn:
    """The forkserver's whole life; it never returns into the server's code."""
    code = 1
    try:
        release()
        multiprocessing.forkserver.main(listener_fd, alive_r, preload)
    except SystemExit as exc:  # how main ends once the server has
        code = exc.code if isinstance(exc.code, int) else 0
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stderr.flush()
        os._exit(code)


def stop() -> None:
    """End the forkserver of a start that failed or was stopped, at once. It may still be
    importing the workers' modules (seconds), and would exit only then: until it did, whoever
    read this process's output through a pipe waited for it, as it holds the same stdout. The
    workers it forked have stopped by then (`start_all`)."""
    pid = multiprocessing.forkserver._forkserver._forkserver_pid
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
