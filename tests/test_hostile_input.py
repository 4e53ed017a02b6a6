"""Hostile requests against a real `pagoda serve`: each is answered with a 4xx in the OpenAI
error shape (or, where HTTP says so, the connection is closed) in bounded time and memory,
and the server serves normally afterwards."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from pathlib import Path

import httpx
import pytest

from tests.serving import Server

MODEL = "tiny"
KEY = "sk-hostile-test-key"
SECRET_PROMPT = "the-prompt-that-must-not-be-logged"
BODY_TIMEOUT_S = 2
GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


@pytest.fixture(scope="module")
def server(tiny_models):
    srv = Server(
        [
            *("--model", str(tiny_models["llama"]), "--served-model-name", MODEL),
            *("--api-key", KEY, "--dtype", "float32", "--max-model-len", "512"),
            *("--max-request-bytes", str(4 << 20)),
            *("--request-body-timeout", str(BODY_TIMEOUT_S)),
        ]
    ).wait_ready()
    yield srv
    assert srv.stop() == 0, srv.log()
    log = srv.log()
    assert KEY not in log and SECRET_PROMPT not in log  # neither keys nor prompts by default


@pytest.fixture(scope="module")
def http(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=30) as client:
        yield client


def post_raw(http: httpx.Client, body: bytes, path: str = "/v1/chat/completions"):
    return http.post(path, content=body, headers={"content-type": "application/json"})


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def raw_exchange(server: Server, head: bytes, body: bytes = b"", timeout: float = 20) -> bytes:
    """Send bytes on a fresh connection; what comes back until the server closes it or
    `timeout` seconds pass (then the test fails: an unbounded wait)."""
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.settimeout(timeout)
        sock.sendall(head + body)
        received = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                part = sock.recv(65536)
            except ConnectionResetError:
                break
            if not part:
                break
            received += part
            if b"\r\n\r\n" in received and _complete(received):
                break
        assert received, "no answer in bounded time"
        return received


def _complete(response: bytes) -> bool:
    head, _, body = response.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def parse_raw(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


def head_for(server: Server, extra: str, path: str = "/v1/chat/completions") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n{extra}\r\n"
    ).encode()


def test_deeply_nested_json(http):
    depth = 10_000
    body = '{"model": "tiny", "messages": ' + "[" * depth + "]" * depth + "}"
    error = assert_openai_error(post_raw(http, body.encode()), 400)
    assert "JSON" in error["message"]
    nested = '{"a": ' * depth + "1" + "}" * depth
    assert_openai_error(post_raw(http, nested.encode()), 400)


def test_huge_content_length_with_small_body(server):
    head = head_for(server, f"Content-Length: {2 << 30}\r\n")
    start = time.monotonic()
    status, body = parse_raw(raw_exchange(server, head, b'{"model": "tiny"}'))
    assert status == 413 and body["error"]["type"] == "invalid_request_error"
    assert time.monotonic() - start < 10


def test_chunked_body_that_never_ends(server):
    head = head_for(server, "Transfer-Encoding: chunked\r\n")
    start = time.monotonic()
    status, body = parse_raw(raw_exchange(server, head, b'5\r\n{"mod\r\n'))
    elapsed = time.monotonic() - start
    assert status == 408 and "did not arrive" in body["error"]["message"]
    assert BODY_TIMEOUT_S <= elapsed < BODY_TIMEOUT_S + 10


def test_endless_chunked_body_is_cut_at_the_size_limit(server):
    chunk = b"a" * 65536
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.settimeout(20)
        sock.sendall(head_for(server, "Transfer-Encoding: chunked\r\n"))
        received = b""
        try:
            for _ in range(200):  # 12.5 MiB, over the 4 MiB limit
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed: the answer is read below
        try:
            while part := sock.recv(65536):
                received += part
        except ConnectionResetError:
            pass
    assert parse_raw(received)[0] == 413


def test_invalid_utf8(http):
    error = assert_openai_error(post_raw(http, b'{"model": "tiny\xff\xfe", "messages": []}'), 400)
    assert "JSON" in error["message"]


def test_nul_bytes(http):
    raw = b'{"model": "tiny", "messages": [{"role": "user", "content": "a\x00b"}]}'
    assert_openai_error(post_raw(http, raw), 400)  # a control character: not JSON
    for body in (
        {**GOOD, "model": "tiny\u0000../x"},
        {**GOOD, "messages": [{"role": "user", "content": "a\u0000b"}]},
        {**GOOD, "user": "a\u0000b"},
        {**GOOD, "stop": ["ok", "\u0000"]},
    ):
        error = assert_openai_error(http.post("/v1/chat/completions", json=body), 400)
        assert "NUL" in error["message"]
    # an escaped backslash before "u0000" is not a NUL
    text = {**GOOD, "messages": [{"role": "user", "content": "a\\u0000b"}]}
    assert http.post("/v1/chat/completions", json=text).status_code == 200


def test_lone_surrogates(http):
    # valid JSON escapes (JavaScript's JSON.stringify writes them for a string cut mid-emoji),
    # but no character: a 400 naming the problem, not the tokenizer's TypeError as a 500
    half = '"cut \\ud83c here"'
    for path, body in (
        ("/v1/chat/completions", GOOD | {"messages": [{"role": "user", "content": "@"}]}),
        ("/v1/completions", {"model": MODEL, "prompt": "@", "max_tokens": 2}),
        ("/v1/chat/completions", GOOD | {"stop": ["@"]}),
        ("/v1/chat/completions", GOOD | {"metadata": {"@": "key"}}),
    ):
        raw = json.dumps(body).replace('"@"', half).encode()
        error = assert_openai_error(post_raw(http, raw, path), 400)
        assert "surrogate (\\ud83c)" in error["message"]
    whole = json.dumps(GOOD | {"messages": [{"role": "user", "content": "\U0001f31f"}]})
    assert "\\ud83c\\udf1f" in whole  # the pair, escaped: one character
    assert post_raw(http, whole.encode()).status_code == 200


@pytest.mark.parametrize("number", ["1e999", "-1e999", "NaN", "Infinity", "-Infinity"])
def test_out_of_range_numbers(http, number):
    for field in ("temperature", "max_tokens", "seed"):
        body = json.dumps(GOOD)[:-1] + f', "{field}": {number}}}'
        assert_openai_error(post_raw(http, body.encode()), 400)
    body = json.dumps(GOOD)[:-1] + f', "tools": [{{"x": {number}}}]}}'  # a free-form field
    assert_openai_error(post_raw(http, body.encode()), 400)


def test_duplicate_keys(http):
    body = b'{"model": "tiny", "model": "other", "messages": [{"role": "user", "content": "x"}]}'
    error = assert_openai_error(post_raw(http, body), 400)
    assert "duplicate key 'model'" in error["message"]
    nested = b'{"model": "tiny", "messages": [{"role": "user", "role": "system", "content": "x"}]}'
    assert_openai_error(post_raw(http, nested), 400)


def test_model_id_path_traversal(server, http):
    for model in ("../../etc/passwd", "/etc/passwd", "..", "tiny/../tiny"):
        error = assert_openai_error(
            http.post("/v1/chat/completions", json={**GOOD, "model": model}), 404
        )
        assert error["code"] == "model_not_found"
        error = assert_openai_error(
            http.post("/v1/embeddings", json={"model": model, "input": "x"}), 404
        )
    for path in ("/v1/models/..%2F..%2Fetc%2Fpasswd", "/v1/images/files/..%2F..%2Fetc%2Fpasswd"):
        assert http.get(path).status_code == 404
        assert "error" in http.get(path).json()
    # not normalized by a client: the path as sent
    head = (
        f"GET /v1/models/../../../etc/passwd HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {KEY}\r\n\r\n"
    ).encode()
    status, body = parse_raw(raw_exchange(server, head))
    assert status == 404 and "error" in body


def test_ten_thousand_messages(http):
    messages = [{"role": "user", "content": "hi"}] * 10_000
    start = time.monotonic()
    r = http.post("/v1/chat/completions", json={**GOOD, "messages": messages})
    assert assert_openai_error(r, 400)["code"] == "context_length_exceeded"
    assert time.monotonic() - start < 60


def _send_head(server: Server, head: bytes, piece: int) -> bytes:
    """Send a request head in pieces of `piece` bytes; what comes back until the server closes
    the connection (b"" where it closed before reading it all, as HTTP allows)."""
    received = b""
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.settimeout(20)
        try:
            for start in range(0, len(head), piece):
                sock.sendall(head[start : start + piece])
            while part := sock.recv(65536):
                received += part
        except (BrokenPipeError, ConnectionResetError):
            pass
        if not received:  # refused mid-head: the answer may still be readable
            with contextlib.suppress(OSError):
                while part := sock.recv(65536):
                    received += part
    return received


def _head(header_bytes: int) -> bytes:
    # Connection: close, so that a served request's connection ends with its answer
    big = "a" * header_bytes
    return f"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: {big}\r\n\r\n".encode()


@pytest.mark.parametrize("piece", [1 << 20, 4096], ids=["one-write", "4KiB-writes"])
def test_one_megabyte_header(server, piece):
    received = _send_head(server, _head(1 << 20), piece)
    if not received:
        return  # closed before the answer could be read: what HTTP allows for a head too large
    assert b"connection: close" in received.partition(b"\r\n\r\n")[0].lower()
    status, body = parse_raw(received)
    assert status == 431, received[:200]
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith("The request line and headers are larger than")


def test_header_within_the_bound_is_served(server):
    received = _send_head(server, _head(60 << 10), 4096)  # under 64 KiB, in many reads
    assert received.startswith(b"HTTP/1.1 200 "), received[:200]


def test_over_the_connection_limit_gets_503_in_the_openai_shape(tiny_models):
    srv = Server(
        [
            *("--model", str(tiny_models["llama"]), "--served-model-name", MODEL),
            *("--dtype", "float32", "--max-model-len", "256", "--limit-concurrency", "2"),
        ]
    ).wait_ready()
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as first:
            assert first.get("/health").status_code == 200  # one connection, kept open
            with httpx.Client(base_url=srv.url, timeout=30) as second:
                r = second.post("/v1/chat/completions", json=GOOD)  # the second: at the limit
                assert r.headers["retry-after"] == "1"
                assert assert_openai_error(r, 503)["type"] == "service_unavailable"
            # the server counts the second connection until it has handled its close, a moment
            # after the client's (on a loaded machine the next request could come first)
            deadline = time.monotonic() + 10
            while (r := first.post("/v1/chat/completions", json=GOOD)).status_code == 503:
                assert time.monotonic() < deadline, "the closed connection is still counted"
                time.sleep(0.1)
            assert r.status_code == 200
    finally:
        assert srv.stop() == 0, srv.log()
    assert "over --limit-concurrency (2): answered 503" in srv.log()


def test_secret_prompt_is_served_but_not_logged(http):
    body = {**GOOD, "messages": [{"role": "user", "content": SECRET_PROMPT}]}
    assert http.post("/v1/chat/completions", json=body).status_code == 200  # log: at teardown


def test_healthy_after_in_bounded_memory(server, http):
    """Last in the module: the server still serves, and the hostile requests left no memory."""
    assert http.get("/health").status_code == 200
    r = http.post("/v1/chat/completions", json=GOOD)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
    rss = _rss_mib(server.process.pid)
    for _ in range(3):  # the heaviest ones again: memory must not grow with each
        test_deeply_nested_json(http)
        test_ten_thousand_messages(http)
        test_duplicate_keys(http)
    assert _rss_mib(server.process.pid) < rss + 100


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")
