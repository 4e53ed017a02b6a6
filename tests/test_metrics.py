"""/metrics against a real `pagoda serve` with a tiny model: the counters move by exactly what
the responses say, whatever the request's n, its stop strings or how it ended."""

from __future__ import annotations

import os
import signal
import time

import httpx
import openai
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.serving import Server, engines_stopped, gone

MODEL = "tiny"
LABELS = {"model_name": MODEL}


@pytest.fixture(scope="module")
def server(tiny_models):
    srv = Server(
        ["--model", str(tiny_models["llama"]), "--served-model-name", MODEL]
        + ["--dtype", "float32", "--max-model-len", "512"]
    ).wait_ready()
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


def scrape(server: Server) -> dict[tuple[str, frozenset], float]:
    """Every sample of /metrics, by name and labels (a duplicate series fails the test)."""
    samples = {}
    for family in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    """A sample's value; the series of the model unless labels name a route."""
    labels = labels if "route" in labels else {**LABELS, **labels}
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: dict, after: dict, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def idle(server: Server, timeout: float = 30) -> dict:
    """The samples once the engine reports nothing running or waiting."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(server)
        running = value(samples, "pagoda:num_requests_running")
        if running == value(samples, "pagoda:num_requests_waiting") == 0:
            return samples
        assert time.monotonic() < deadline, f"still {running} running"
        time.sleep(0.2)


def story(**fields) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "tell a story"}],
        "ignore_eos": True,
        **fields,
    }


def sdk_chat(client: openai.OpenAI, **fields):
    """A chat request through the SDK (vLLM's `ignore_eos` travels in extra_body)."""
    body = story(**fields)
    return client.chat.completions.create(extra_body={"ignore_eos": body.pop("ignore_eos")}, **body)


def test_generation_tokens_are_the_usage_with_stop_strings_and_n(server, client):
    """A choice that meets its stop string ends there: the tokens its engine sequence makes
    until the request's other choices finish are neither sent nor billed, nor counted."""
    before = idle(server)
    completion_tokens = 0
    reasons = []
    for seed in range(6):
        response = sdk_chat(client, seed=seed, n=3, max_tokens=40, temperature=1.0, stop=["e", "a"])
        completion_tokens += response.usage.completion_tokens
        reasons += [choice.finish_reason for choice in response.choices]
    after = idle(server)
    assert "stop" in reasons  # the stop strings did cut choices short
    assert moved(before, after, "pagoda:generation_tokens_total") == completion_tokens
    assert moved(before, after, "pagoda:requests_total", finish_reason="stop") == reasons.count(
        "stop"
    )


def test_inter_token_latency_is_per_choice(server, client):
    """n choices advance together: the time between tokens is each choice's, n * (tokens - 1)
    observations, not the gap between two choices' tokens of one step."""
    before = idle(server)
    sdk_chat(client, n=3, max_tokens=5, temperature=1.0)
    after = idle(server)
    assert moved(before, after, "pagoda:inter_token_latency_seconds_count") == 3 * 4
    assert moved(before, after, "pagoda:time_to_first_token_seconds_count") == 1
    assert moved(before, after, "pagoda:e2e_request_latency_seconds_count") == 1
    assert moved(before, after, "pagoda:requests_total", finish_reason="length") == 3


def test_an_aborted_stream_counts(server):
    """A client that leaves mid-stream: its choice counts under finish_reason "abort", and its
    request's latency and tokens count too."""
    before = idle(server)
    body = story(max_tokens=400, stream=True)
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body) as response:
        events = 0
        for line in response.iter_lines():
            events += line.startswith("data: ")
            if events == 3:
                break
    after = idle(server)
    assert moved(before, after, "pagoda:requests_total", finish_reason="abort") == 1
    assert moved(before, after, "pagoda:request_success_total", finished_reason="abort") == 1
    assert moved(before, after, "pagoda:e2e_request_latency_seconds_count") == 1
    assert 3 <= moved(before, after, "pagoda:generation_tokens_total") < 400
    assert moved(before, after, "pagoda:prompt_tokens_total") > 0


def test_a_client_that_leaves_a_plain_request_ends_it(server):
    """A non-streamed request whose client hangs up is aborted in the engine (it no longer
    holds a batch slot) and answered 499, not finished and counted as a 200."""
    before = idle(server)
    with engines_stopped([server.engine_pid()]), pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/chat/completions", json=story(max_tokens=400), timeout=1.0)
    after = idle(server)
    route = {"route": "/v1/chat/completions"}
    assert moved(before, after, "pagoda:http_responses_total", **route, status="499") == 1
    assert moved(before, after, "pagoda:http_responses_total", **route, status="200") == 0
    assert moved(before, after, "pagoda:requests_total", finish_reason="abort") == 1
    assert moved(before, after, "pagoda:requests_total", finish_reason="length") == 0


def test_a_dead_engine_runs_nothing(server):
    """While a killed engine restarts, /metrics does not show the dead process's last load."""
    body = story(max_tokens=400, stream=True)
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        deadline = time.monotonic() + 30
        while value(scrape(server), "pagoda:num_requests_running") == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        engine = psutil.Process(server.engine_pid())
        os.kill(engine.pid, signal.SIGKILL)
        assert gone(engine)
        response.read()
    samples = scrape(server)  # within the restart's backoff (a second)
    assert value(samples, "pagoda:model_ready") == 0
    assert value(samples, "pagoda:num_requests_running") == 0
    assert value(samples, "pagoda:kv_cache_usage_perc") == 0
    server.wait_ready()


def test_prefix_cache_hits_and_request_lengths(server, client):
    """vLLM's prefix-cache counters (in prompt tokens) and per-request length histograms move
    by the responses' usage."""
    before = idle(server)
    prompt = "a long shared system prompt " * 12
    usages = [
        sdk_chat(client, messages=[{"role": "user", "content": prompt}], max_tokens=3 + i).usage
        for i in range(2)
    ]
    after = idle(server)
    cached = [u.prompt_tokens_details.cached_tokens for u in usages]
    assert cached[0] < cached[1]  # the second found the first's prompt
    prompt_tokens = sum(u.prompt_tokens for u in usages)
    assert moved(before, after, "pagoda:prefix_cache_queries_total") == prompt_tokens
    assert moved(before, after, "pagoda:prefix_cache_hits_total") == sum(cached)
    assert moved(before, after, "pagoda:request_prompt_tokens_count") == 2
    assert moved(before, after, "pagoda:request_prompt_tokens_sum") == prompt_tokens
    assert moved(before, after, "pagoda:request_generation_tokens_sum") == 3 + 4
    assert moved(before, after, "pagoda:request_generation_tokens_bucket", le="5.0") == 2


def test_request_series_start_at_zero(tiny_models):
    """Before its first request a model's series are there at 0 (as vLLM's), so that
    `increase()` counts the first request and panels show 0, not "no data"."""
    fresh = Server(
        ["--model", str(tiny_models["llama"]), "--served-model-name", MODEL]
        + ["--dtype", "float32", "--max-model-len", "512"]
    ).wait_ready()
    try:
        samples = scrape(fresh)
    finally:
        assert fresh.stop() == 0
    for name in (
        "pagoda:prompt_tokens_total",
        "pagoda:generation_tokens_total",
        "pagoda:prefix_cache_queries_total",
        "pagoda:time_to_first_token_seconds_count",
        "pagoda:e2e_request_latency_seconds_count",
        "pagoda:request_generation_tokens_count",
    ):
        assert (name, frozenset(LABELS.items())) in samples, name
    for reason in ("stop", "length", "abort"):
        assert value(samples, "pagoda:requests_total", finish_reason=reason) == 0
        key = (
            "pagoda:request_success_total",
            frozenset({**LABELS, "finished_reason": reason}.items()),
        )
        assert samples[key] == 0


def test_the_drains_503s_are_counted(tiny_models):
    """After SIGTERM, the 503s that refuse new requests count in http_responses_total, which
    /metrics serves on through the drain."""
    draining = Server(
        ["--model", str(tiny_models["llama"]), "--served-model-name", MODEL]
        + ["--dtype", "float32", "--max-model-len", "512", "--shutdown-timeout", "20"]
    ).wait_ready()
    chat = f"{draining.url}/v1/chat/completions"
    try:
        with (
            engines_stopped([draining.engine_pid()]),
            httpx.stream("POST", chat, json=story(max_tokens=50, stream=True)) as held,
        ):
            assert held.status_code == 200
            draining.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while httpx.get(f"{draining.url}/health").status_code != 503:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            assert httpx.post(chat, json=story(max_tokens=2)).status_code == 503
            samples = scrape(draining)
        route = {"route": "/v1/chat/completions"}
        assert value(samples, "pagoda:http_responses_total", **route, status="503") == 1
        assert value(samples, "pagoda:http_responses_total", route="/health", status="503") >= 1
    finally:
        assert draining.stop() == 0
