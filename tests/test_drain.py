"""SIGTERM drains a real `pagoda serve`: /health and new requests answer 503 at once, a
running stream that can finish within --shutdown-timeout finishes, the others end with an
error event and [DONE], and the server exits 0."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import httpx

from tests.serving import Server

TIMEOUT_S = 15.0  # room for SHORT tokens on a loaded machine
SHORT = 100
LONG = 60_000  # tokens: no machine makes them within TIMEOUT_S


def _stream(url: str, model: str, max_tokens: int, first: threading.Event, out: list) -> None:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "go on"}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
    }
    events = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
                first.set()
    out.append(events)


def _long_model(tiny_models, tmp_path) -> str:
    """qwen2 (plain RoPE) with room for LONG tokens."""
    folder = tmp_path / "long"
    shutil.copytree(tiny_models["qwen2"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 2 * LONG
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def _one_stream(
    tiny_models, tmp_path, shutdown_timeout: float, max_tokens: int
) -> tuple[Server, threading.Thread, list[list]]:
    """A server of the long model with one stream running (its first event arrived)."""
    model = _long_model(tiny_models, tmp_path)
    args = ["--model", model, "--dtype", "float32", "--shutdown-timeout", str(shutdown_timeout)]
    server = Server(args).wait_ready()
    streams: list[list] = []
    started = threading.Event()
    thread = threading.Thread(
        target=_stream, args=(server.url, model, max_tokens, started, streams)
    )
    thread.start()
    assert started.wait(60)
    return server, thread, streams


def test_sigterm_drains_finishes_what_fits_ends_the_rest_and_exits_zero(tiny_models, tmp_path):
    model = _long_model(tiny_models, tmp_path)
    args = ["--model", model, "--dtype", "float32", "--shutdown-timeout", str(TIMEOUT_S)]
    server = Server(args).wait_ready()
    long_streams: list[list] = []
    short_stream: list[list] = []
    started = [threading.Event() for _ in range(4)]
    threads = [
        threading.Thread(target=_stream, args=(server.url, model, LONG, started[i], long_streams))
        for i in range(3)
    ]
    threads.append(
        threading.Thread(target=_stream, args=(server.url, model, SHORT, started[3], short_stream))
    )
    for thread, event in zip(threads, started):  # the short one last: it runs at SIGTERM
        thread.start()
        assert event.wait(60)
    signalled = time.monotonic()
    server.process.send_signal(signal.SIGTERM)

    health = httpx.get(f"{server.url}/health", timeout=5)
    assert health.status_code == 503 and health.json() == {"status": "draining"}
    refused = httpx.post(
        f"{server.url}/v1/completions", json={"model": model, "prompt": "hi"}, timeout=5
    )
    assert refused.status_code == 503 and refused.headers["connection"] == "close"
    assert refused.json()["error"]["type"] == "service_unavailable"
    assert "shutting down" in refused.json()["error"]["message"]

    for thread in threads:
        thread.join(60)
    (short,) = short_stream
    assert short[-1] == "[DONE]"
    assert json.loads(short[-2])["choices"][0]["finish_reason"] == "length"
    assert len(long_streams) == 3
    for events in long_streams:
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["type"] == "service_unavailable" and "shutting down" in error["message"]
    assert server.stop() == 0
    assert time.monotonic() - signalled < TIMEOUT_S + 15  # the drain is bounded
    log = server.log()
    assert "draining: /health and new requests answer 503; 4 requests in flight" in log
    assert "ending 3 requests still running with a 503" in log


def test_a_second_sigterm_ends_the_drain_at_once(tiny_models, tmp_path):
    server, thread, streams = _one_stream(tiny_models, tmp_path, 600, LONG)
    server.process.send_signal(signal.SIGTERM)
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 503
    server.process.send_signal(signal.SIGTERM)
    thread.join(60)
    (events,) = streams
    assert events[-1] == "[DONE]" and "shutting down" in events[-2]
    assert server.stop(timeout=60) == 0  # long before the 600 s


def test_sigterm_to_every_process_still_drains(tiny_models, tmp_path):
    """systemd's default KillMode (control-group), `timeout` and Ctrl-C signal every process
    of the server, its model's engine included. Before, the engine died of the SIGTERM: the
    stream in flight ended with a 503 instead of finishing, and the server began restarting
    the engine while it drained."""
    server, thread, streams = _one_stream(tiny_models, tmp_path, TIMEOUT_S, SHORT)
    os.kill(server.engine_pid(), signal.SIGTERM)
    server.process.send_signal(signal.SIGTERM)
    thread.join(60)
    (events,) = streams
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    assert server.stop() == 0
    assert "restarting" not in server.log()


def _eos_id(model: str) -> int:
    return json.loads((Path(model) / "config.json").read_text())["eos_token_id"]


def test_a_background_response_is_drained_as_a_request(tiny_models, tmp_path):
    """A background response (/v1/responses, background: true) runs after its answer began:
    the drain counts it in flight, waits for it, and ends it with a response.failed event
    saying why, as it ends a stream."""
    model = _long_model(tiny_models, tmp_path)
    server = Server(["--model", model, "--dtype", "float32", "--shutdown-timeout", "2"])
    server.wait_ready()
    body = {
        "model": model,
        "input": "go on",
        "max_output_tokens": LONG,
        "seed": 3,
        "logit_bias": {str(_eos_id(model)): -100},  # it runs into the drain's end
        "background": True,
        "stream": True,
    }
    events: list[dict] = []
    started = threading.Event()

    def follow() -> None:
        with httpx.stream("POST", f"{server.url}/v1/responses", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line.removeprefix("data: ")))
                    started.set()

    thread = threading.Thread(target=follow)
    thread.start()
    assert started.wait(60)
    server.process.send_signal(signal.SIGTERM)
    thread.join(60)
    last = events[-1]
    assert last["type"] == "response.failed" and last["response"]["status"] == "failed"
    assert "shutting down" in last["response"]["error"]["message"]
    assert server.stop() == 0
    log = server.log()
    assert "draining: /health and new requests answer 503; 1 requests in flight" in log
    assert "ending 1 requests still running with a 503" in log
