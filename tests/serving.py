"""A real `pagoda serve` in a subprocess on 127.0.0.1, for the HTTP tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import yaml

from tests.zygote import Zygote

DEFAULT_CATALOG = Path(__file__).resolve().parents[1] / "models.yaml"


def default_chat_catalog(folder: Path) -> Path:
    """The default catalog's enabled chat entry (SmolLM2) alone, as a catalog in `folder`: for
    tests of the chat model, whose server then neither loads MiniLM nor has its forkserver
    import sentence-transformers (8-12 s of a start on two cores)."""
    entries = yaml.safe_load(DEFAULT_CATALOG.read_text())["models"]
    chat = [e for e in entries if e["kind"] == "chat" and e.get("enabled", True)]
    assert len(chat) == 1, chat
    catalog = folder / "models.yaml"
    catalog.write_text(yaml.safe_dump({"models": chat}, sort_keys=False))
    return catalog


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """A test server's environment: this process's, offline, with `extra` on top."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", **(extra or {})}


def failed_start(*args: str, timeout: float = 300) -> str:
    """`pagoda serve ARGS` that must fail to start (exit 1): what it wrote to stderr."""
    env = _server_env()
    with tempfile.TemporaryDirectory() as folder:
        stderr = Path(folder) / "stderr"
        argv = ["serve", *args]
        process = _zygote(env).start(argv, env, Path.cwd(), Path(os.devnull), stderr)
        try:
            code = process.wait(timeout)
        finally:
            process.kill()
        assert code == 1, stderr.read_text()
        return stderr.read_text()


_ZYGOTES: list[Zygote] = []


def _zygote(env: dict[str, str]) -> Zygote:
    """This test process's zygote for `env`: started at its first server, and again after a
    test changed the process's environment (an in-process tensor-parallel engine sets
    PYTORCH_NVML_BASED_CUDA_CHECK for good; lm-eval's tests set HF_DATASETS_OFFLINE). One
    started before lives on: it reports the exit of the servers it forked."""
    zygote = next((z for z in _ZYGOTES if z.serves(env)), None)
    if zygote is None:
        zygote = Zygote(env)
        _ZYGOTES.append(zygote)
    return zygote


class Server:
    def __init__(
        self,
        args: list[str],
        env: dict[str, str] | None = None,
        command: list[str] | None = None,
        cwd: Path | None = None,
        new_session: bool = False,
    ) -> None:
        """`new_session`: the server leads a process group of its own, as under a terminal or
        systemd (its workers are in it too), for signals sent to the whole group."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"pagoda-test-{self.port}.log"
        self._log = self.log_path.open("w")
        argv = ["serve", "--port", str(self.port), *args]
        forked = env is None and command is None
        env = _server_env(env)
        if forked:
            log = self.log_path
            self.process = _zygote(env).start(argv, env, cwd or Path.cwd(), log, log, new_session)
            return
        command = command or [sys.executable, "-m", "pagoda"]
        self.process = subprocess.Popen(
            [*command, *argv],
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=new_session,
        )

    def wait_ready(self, timeout: float = 180.0) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"pagoda serve exited {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"pagoda serve did not come up:\n{self.log()}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def engine_pid(self) -> int:
        """The process of the server's one model, as /health reports it."""
        (state,) = httpx.get(f"{self.url}/health").json()["models"].values()
        return state["pid"]

    def running(self, model: str | None = None) -> float:
        """Sequences running, as /metrics reports them: one model's, or every model's."""
        total = 0.0
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            if line.startswith("pagoda:num_requests_running{") and (
                model is None or f'model_name="{model}"' in line
            ):
                total += float(line.split()[-1])
        return total

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, as an orchestrator would; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


def gone(process: psutil.Process, timeout: float = 30) -> bool:
    """Whether the process ends within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if process.status() == psutil.STATUS_ZOMBIE:  # nobody reaps it here; it holds nothing
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


@contextlib.contextmanager
def engines_stopped(pids: list[int]):
    """The engine processes stopped (SIGSTOP): no step runs and no stats come, so what the
    server admits meanwhile is decided by its own count of what it sent."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


@contextlib.asynccontextmanager
async def held_streams(client: httpx.AsyncClient, url: str, bodies: list[dict]):
    """A stream opened for each body, one after the other, each begun in the server (its
    request sent to the engine) before the next; all closed on leaving."""
    async with contextlib.AsyncExitStack() as stack:
        for body in bodies:
            response = await stack.enter_async_context(client.stream("POST", url, json=body))
            assert response.status_code == 200, await response.aread()
            await asyncio.sleep(0.5)  # the 200 goes out before the body's generator starts
        yield
