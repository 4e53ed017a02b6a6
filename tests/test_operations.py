"""What an operator sees of a real `pagoda serve`: its logs (text or JSON lines, no probes in the
access log, no progress bars in a file), its /metrics, and how it treats request fields it does
not recognize."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import httpx
import openai
import pytest
import torch

from pagoda.server.protocol import ChatCompletionRequest, CompletionRequest
from pagoda.server.request_fields import unrecognized
from tests.serving import Server

MODEL = "tiny-llama"
KEY = "sk-operations-key"
COMMON = ["--served-model-name", MODEL, "--dtype", "float32", "--max-model-len", "512"]
HAS_CPU_KERNELS = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512", "AMX")


@pytest.fixture(scope="module")
def json_server(tiny_models):
    srv = Server(
        [
            "--model",
            str(tiny_models["llama"]),
            *COMMON,
            "--api-key",
            KEY,
            "--log-format",
            "json",
            "--max-concurrent-requests",
            "1",
        ]
    ).wait_ready()
    yield srv
    assert srv.stop() == 0, srv.log()
    assert KEY not in srv.log()


@pytest.fixture(scope="module")
def strict_server(tiny_models):
    srv = Server(
        [
            "--model",
            str(tiny_models["llama"]),
            *COMMON,
            "--strict-request-fields",
            "--log-probe-requests",
        ]
    ).wait_ready()
    yield srv
    assert srv.stop() == 0, srv.log()


def sdk(server: Server, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)


def chat(client: openai.OpenAI, **kwargs):
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=3, **kwargs
    )


def json_lines(server: Server) -> list[dict]:
    return [json.loads(line) for line in server.log().splitlines() if line.strip()]


def access_paths(server: Server) -> list[str]:
    return [e["path"] for e in json_lines(server) if e["logger"] == "uvicorn.access"]


def sample(metrics: str, name: str, **labels: str) -> float:
    """The value of one series, 0 when it is not there yet."""
    for line in metrics.splitlines():
        match = re.fullmatch(r"([^{ ]+)(?:\{(.*)\})? (\S+)", line)
        if match is None or match[1] != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match[2] or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(match[3])
    return 0.0


def scrape(server: Server) -> str:
    return httpx.get(f"{server.url}/metrics").text


# -- logs ------------------------------------------------------------------------------------


def test_every_log_line_is_a_json_object(json_server):
    chat(sdk(json_server))
    entries = json_lines(json_server)  # raises on a line that is not JSON
    assert all({"time", "level", "logger", "process", "message"} <= e.keys() for e in entries)
    loggers = {e["logger"] for e in entries}
    assert {"pagoda", "uvicorn.error", "uvicorn.access"} <= loggers
    engine = [e for e in entries if e["process"] == f"pagoda-engine-{MODEL}"]
    assert any(e["logger"] == "pagoda.engine.llm_engine" for e in engine)
    access = next(e for e in entries if e["logger"] == "uvicorn.access")
    assert access["method"] == "POST" and access["path"] == "/v1/chat/completions"
    assert access["status"] == 200


def test_weights_loading_logs_lines_not_a_bar(json_server):
    log = json_server.log()
    assert "\r" not in log  # a progress bar's carriage returns would glue lines together
    messages = [e["message"] for e in json_lines(json_server)]
    assert any(re.fullmatch(r"Loading weights: \d+ tensors in [\d.]+ s", m) for m in messages)


@pytest.mark.skipif(not HAS_CPU_KERNELS, reason="the C++ kernels need AVX2 or AVX-512")
def test_cpu_kernel_builds_are_logged(json_server):
    messages = [e["message"] for e in json_lines(json_server)]
    for name in ("attention_cpu", "elementwise_cpu", "linear_cpu"):
        pattern = rf"CPU kernel {name}: (built \S+ in [\d.]+ s|loaded cached \S+)"
        assert any(re.fullmatch(pattern, m) for m in messages), name


def test_keys_in_a_query_string_stay_out_of_the_log(json_server, strict_server):
    # the server reads keys from the Authorization header only, but a client may put one in
    # the URL (Azure's SDK sends ?api-key=); the access log shows the rest of the query
    query = "?api_key=sk-in-the-url&api-key=sk-azure&model=m&limit=2"
    for server in (json_server, strict_server):  # JSON and text lines
        headers = {"Authorization": f"Bearer {KEY}"}
        assert httpx.get(f"{server.url}/v1/models{query}", headers=headers).status_code == 200
        assert httpx.get(f"{server.url}/nope{query}").status_code in (401, 404)
        log = server.log()
        assert "sk-in-the-url" not in log and "sk-azure" not in log
        assert "/v1/models?api_key=***&api-key=***&model=m&limit=2" in log
    assert "/v1/models?api_key=***&api-key=***&model=m&limit=2" in access_paths(json_server)


def test_probes_stay_out_of_the_access_log(json_server):
    for _ in range(3):
        assert httpx.get(f"{json_server.url}/health").status_code == 200
        assert httpx.get(f"{json_server.url}/metrics").status_code == 200
    sdk(json_server).models.list()
    paths = access_paths(json_server)
    assert "/v1/models" in paths
    assert "/health" not in paths and "/metrics" not in paths


def test_text_log_with_probe_requests(strict_server):
    httpx.get(f"{strict_server.url}/health")
    sdk(strict_server, "any").models.list()
    lines = strict_server.log().splitlines()
    assert not any(line.startswith("{") for line in lines)
    assert any('"GET /health HTTP/1.1" 200' in line for line in lines)
    engine = f" pagoda-engine-{MODEL} pagoda.engine.llm_engine: loaded "
    assert any(engine in line for line in lines)


# -- metrics ---------------------------------------------------------------------------------


def test_http_responses_by_route_and_status(json_server):
    before = scrape(json_server)
    name = "pagoda:http_responses_total"

    with pytest.raises(openai.AuthenticationError):
        sdk(json_server, "wrong-key").models.list()
    with pytest.raises(openai.NotFoundError):
        sdk(json_server).chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}]
        )
    assert httpx.get(f"{json_server.url}/no/such/route").status_code == 404
    assert httpx.get(f"{json_server.url}/v1/models/{MODEL}").status_code == 401

    # one request in flight, the limit: the next one gets 429
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 400,
        "ignore_eos": True,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {KEY}"}
    url = f"{json_server.url}/v1/chat/completions"
    with httpx.stream("POST", url, json=body, headers=headers, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                busy = httpx.post(url, json=body, headers=headers)
                break
    assert busy.status_code == 429

    after = scrape(json_server)
    for route, status, count in [
        ("/v1/models", "401", 1),
        ("/v1/models/{model_id:path}", "401", 1),
        ("/v1/chat/completions", "404", 1),
        ("unmatched", "404", 1),
        ("/v1/chat/completions", "429", 1),
        ("/v1/chat/completions", "200", 1),
    ]:
        labels = {"route": route, "status": status}
        assert sample(after, name, **labels) - sample(before, name, **labels) == count, labels
    assert not any("/no/such/route" in line for line in after.splitlines())


def test_no_created_series(json_server):
    chat(sdk(json_server))
    text = scrape(json_server)
    assert "pagoda:requests_total" in text
    # vLLM's series for the same count, under its name and label (its dashboards query it)
    for reason in ("stop", "length"):
        assert sample(
            text, "pagoda:request_success_total", model_name=MODEL, finished_reason=reason
        ) == sample(text, "pagoda:requests_total", model_name=MODEL, finish_reason=reason)
    assert (
        sum(
            sample(text, "pagoda:request_success_total", model_name=MODEL, finished_reason=r)
            for r in ("stop", "length")
        )
        >= 1
    )
    assert "_created" not in text


def test_preemptions_counter_and_queue_time(json_server):
    text = scrape(json_server)
    assert "# TYPE pagoda:num_preemptions_total counter" in text
    assert sample(text, "pagoda:num_preemptions_total", model_name=MODEL) == 0
    assert "# TYPE pagoda:request_queue_time_seconds histogram" in text

    name = "pagoda:request_queue_time_seconds_count"
    before = sample(text, name, model_name=MODEL)
    client = sdk(json_server)
    for _ in range(3):
        chat(client, n=2)  # counted once per request, not per choice
    after = scrape(json_server)
    assert sample(after, name, model_name=MODEL) == before + 3
    inf = sample(after, "pagoda:request_queue_time_seconds_bucket", model_name=MODEL, le="+Inf")
    assert inf == before + 3
    assert 0 < sample(after, "pagoda:request_queue_time_seconds_sum", model_name=MODEL) < 60


# -- request fields the server does not recognize --------------------------------------------


def test_unknown_field_is_warned_about_once(json_server):
    client = sdk(json_server)
    messages = [{"role": "user", "content": "hi", "cache_control": {"type": "ephemeral"}}]
    for _ in range(2):
        r = client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=2,
            store=False,  # an OpenAI field with no effect here: no warning
            extra_body={"temperatur": 0.5},
        )
        assert r.choices[0].message.content is not None
    warnings = [e["message"] for e in json_lines(json_server) if e["level"] == "WARNING"]
    assert len([w for w in warnings if "'temperatur'" in w]) == 1
    assert len([w for w in warnings if "'messages.cache_control'" in w]) == 1
    assert not any("'store'" in w for w in warnings)


@pytest.mark.parametrize(
    ("endpoint", "body", "param"),
    [
        ("chat", {"temperatur": 0.5}, "temperatur"),
        ("chat", {"stream": True, "stream_options": {"include_usage": True, "x": 1}}, None),
        ("completions", {"best_off": 2}, "best_off"),
    ],
)
def test_strict_refuses_unknown_fields(strict_server, endpoint, body, param):
    client = sdk(strict_server, "any")
    param = param or "stream_options.x"
    with pytest.raises(openai.BadRequestError) as info:
        if endpoint == "chat":
            chat(client, extra_body=body)
        else:
            client.completions.create(model=MODEL, prompt="hi", max_tokens=2, extra_body=body)
    assert info.value.status_code == 400
    assert info.value.response.json() == {
        "error": {
            "message": f"Unrecognized request argument supplied: {param}",
            "type": "invalid_request_error",
            "param": param,
            "code": None,
        }
    }


def test_strict_refuses_nested_message_fields(strict_server):
    messages = [{"role": "user", "content": "hi"}, {"role": "user", "content": "x", "cahce": 1}]
    with pytest.raises(openai.BadRequestError) as info:
        sdk(strict_server, "any").chat.completions.create(model=MODEL, messages=messages)
    assert info.value.response.json()["error"]["param"] == "messages.1.cahce"


def test_strict_accepts_openai_fields_and_an_echoed_reply(strict_server):
    client = sdk(strict_server, "any")
    first = chat(client, store=False, metadata={"team": "a"}, service_tier="auto", user="u1")
    reply = first.choices[0].message.model_dump()  # refusal, audio, annotations, ... as null
    messages = [{"role": "user", "content": "hello"}, reply, {"role": "user", "content": "more"}]
    again = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    assert again.choices[0].finish_reason in ("stop", "length")


def test_unrecognized_names_the_path_of_each_field():
    body = {
        "model": "m",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "a", "colour": 1}]},
            {"role": "assistant", "content": "b", "refusal": None, "extra": 2},
        ],
        "stream_options": {"include_usage": True, "include_obfuscation": False},
        "store": True,
        "priority": 1,
    }
    assert list(unrecognized(ChatCompletionRequest, body)) == [
        ("messages.0.content.0.colour", "messages.content.colour"),
        ("messages.1.extra", "messages.extra"),
        ("priority", "priority"),
    ]
    assert list(unrecognized(CompletionRequest, {"model": "m", "prompt": "p", "echo": 1})) == []


TRITON_COMPILE = """
import logging, torch
from pagoda.kernels import backends
from pagoda.logs import LogSettings, setup_logging
setup_logging(LogSettings())
ops = backends.select("triton", torch.device("cuda"))
x = torch.randn(5, 96, device="cuda", dtype=torch.float16)
ops.rms_norm(x, torch.ones(96, device="cuda", dtype=torch.float16), 1e-6)
torch.cuda.synchronize()
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton compiles only on a GPU")
def test_triton_compilations_are_logged(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a real compilation, not a load from the cache
    done = subprocess.run(
        [sys.executable, "-c", TRITON_COMPILE], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert re.search(r"Triton kernel _rms_norm_kernel: compiled in [\d.]+ s", done.stderr)
