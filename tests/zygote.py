"""Test servers forked from a process that has imported the server's modules once.

Each `pagoda serve` spent 5-6 s of CPU importing torch, transformers, the engine and the HTTP
stack before it read its catalog, 70 servers and a dozen starts that fail late a run. A server
forked from this process (the test process's "zygote") runs the same `main` with the same
arguments, environment, working directory and output files; only the imports are done
already. `tests/serving.py` starts its servers (`Server`, `failed_start`) here. A server given
an environment or a command of its own (an installed wheel's) is a subprocess; so is every
start that must show what a fresh interpreter imports (tests/test_cli.py).

    test process ── connects, sends the request ──> zygote: imports once, then per request
                   <── the server's pid, then          └─ fork: setsid, cwd, env, stdout, stderr,
                       its exit code, on that socket        `pagoda.server.cli.main(argv)`

Like `pagoda serve` before its own fork, the zygote is one thread that has run no torch op:
its forks may use OpenMP and start processes of their own.
"""

from __future__ import annotations

import importlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

_WORD = struct.Struct("q")
_READY = b"ready\n"


class Zygote:
    """The test process's side: starts the zygote, and asks it for servers."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        name = f"pagoda-test-zygote-{os.getpid()}-{id(self)}"
        self.address = "\0" + name  # Linux's abstract socket namespace: no file to remove
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from tests.zygote import run; run()", name],
            stdin=subprocess.PIPE,  # the zygote exits when this closes (with the test process)
            stdout=subprocess.PIPE,
            env=env,
            cwd=Path(__file__).resolve().parents[1],
        )
        line = self.process.stdout.readline()
        self.process.stdout.close()
        if line != _READY:
            raise RuntimeError(f"the test zygote did not start: {line!r}")

    def serves(self, env: dict[str, str]) -> bool:
        """Whether a server with `env` may fork from here: what the zygote's imports read of
        the environment is what the server's would have read. (pytest sets the test's name in
        PYTEST_CURRENT_TEST, which no import reads, for each test.)"""
        return _without_test_name(env) == _without_test_name(self.env)

    def start(
        self,
        argv: list[str],
        env: dict[str, str],
        cwd: Path,
        stdout: Path,
        stderr: Path,
        new_session: bool = False,
    ) -> ForkedServer:
        """`pagoda ARGV`, its output appended to the files `stdout` and `stderr` (which may be
        one file)."""
        conn = socket.socket(socket.AF_UNIX)
        conn.connect(self.address)
        request = {
            "argv": argv,
            "env": env,
            "cwd": str(cwd),
            "stdout": str(stdout),
            "stderr": str(stderr),
            "setsid": new_session,
        }
        conn.sendall(json.dumps(request).encode() + b"\n")
        return ForkedServer(conn)


def _without_test_name(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k != "PYTEST_CURRENT_TEST"}


class ForkedServer:
    """What the tests use of `subprocess.Popen`, for a server the zygote forked: its exit code
    comes from the zygote, which reaps it."""

    def __init__(self, conn: socket.socket) -> None:
        self._conn = conn
        self.pid = self._read_word()
        self.returncode: int | None = None

    def _read_word(self) -> int:
        data = b""
        while len(data) < _WORD.size:
            chunk = self._conn.recv(_WORD.size - len(data))
            if not chunk:
                raise RuntimeError("the test zygote ended before the server it forked")
            data += chunk
        return _WORD.unpack(data)[0]

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            if not select.select([self._conn], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired("pagoda serve", timeout)
            self.returncode = self._read_word()
            self._conn.close()
        return self.returncode

    def poll(self) -> int | None:
        try:
            return self.wait(0)
        except subprocess.TimeoutExpired:
            return None

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def run() -> None:
    """The zygote: import, then fork a server per request; return only in a fork, into
    `pagoda serve`."""
    from pagoda.engine.worker import check_cuda_through_nvml

    check_cuda_through_nvml()  # as `pagoda serve` does before these imports
    for module in ("pagoda.server.cli", "pagoda.server.forkserver", "pagoda.server.serve"):
        importlib.import_module(module)
    from pagoda.server import cli, forkserver

    for module in forkserver.SHARED_IMPORTS:
        importlib.import_module(module)
    request = _serve(sys.argv[1])
    _become_server(request)
    sys.exit(cli.main(request["argv"]))


def _serve(address: str) -> dict:
    listener = socket.socket(socket.AF_UNIX)
    listener.bind("\0" + address)
    listener.listen()
    wakeup_r, wakeup_w = os.pipe()
    os.set_blocking(wakeup_w, False)
    signal.set_wakeup_fd(wakeup_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    sys.stdout.buffer.write(_READY)
    sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, sys.stdout.fileno())
    waiting: dict[int, socket.socket] = {}  # pid -> the connection that asked for it
    while True:
        readable = select.select([listener, wakeup_r, sys.stdin], [], [])[0]
        if sys.stdin in readable:  # the test process ended
            os._exit(0)
        if wakeup_r in readable:
            os.read(wakeup_r, 4096)
            _reap(waiting)
        if listener in readable:
            conn, _ = listener.accept()
            request = json.loads(conn.makefile("rb").readline())
            pid = os.fork()
            if pid == 0:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                for fd in (wakeup_r, wakeup_w, devnull):
                    os.close(fd)
                for other in (listener, conn, *waiting.values()):
                    other.close()
                return request
            conn.sendall(_WORD.pack(pid))
            waiting[pid] = conn


def _reap(waiting: dict[int, socket.socket]) -> None:
    while waiting:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            return
        conn = waiting.pop(pid)
        conn.sendall(_WORD.pack(os.waitstatus_to_exitcode(status)))
        conn.close()


def _become_server(request: dict) -> None:
    """What `subprocess.Popen` would have set up: a session of its own if asked, the working
    directory, the environment, no stdin, stdout and stderr on their files."""
    os.environ.clear()
    os.environ.update(request["env"])
    if request["setsid"]:
        os.setsid()
    os.chdir(request["cwd"])
    for target, path, flags in [
        (0, os.devnull, os.O_RDONLY),
        (1, request["stdout"], os.O_WRONLY | os.O_APPEND | os.O_CREAT),
        (2, request["stderr"], os.O_WRONLY | os.O_APPEND | os.O_CREAT),
    ]:
        fd = os.open(path, flags, 0o644)
        os.dup2(fd, target)
        os.close(fd)
    sys.argv = [sys.argv[0], *request["argv"]]
