"""Keys, limits and the usage ledger: the `pagoda keys`/`pagoda usage` commands, and a real
`pagoda serve` on a SQLite file driven by the openai SDK and httpx (PostgreSQL:
tests/test_keys_postgres.py)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import openai
import pytest
import sqlalchemy as sa

from pagoda.server.catalog import Pricing
from pagoda.server.keys import store
from pagoda.server.keys.database import open_database, schema_version
from pagoda.server.keys.gateway import Gateway
from pagoda.server.keys.limits import KeyState, Window, duration
from pagoda.server.keys.meter import Meter
from tests.serving import Server
from tests.tiny_models import EOS_ID

MODEL = "test-org/tiny-llama"
STATIC = "sk-static-test-key"
ADMIN = "sk-admin-test-key"
# USD per 1M tokens: an input token costs $0.001, an output token $0.002
PRICING = {"input_per_1m": 1000.0, "output_per_1m": 2000.0}
SECRETS: list[str] = []  # every key handed out here: none may reach a log
RATE_HEADERS = [
    f"x-ratelimit-{what}-{kind}"
    for kind in ("requests", "tokens")
    for what in ("limit", "remaining", "reset")
]


def pagoda(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pagoda", *args],
        capture_output=True,
        text=True,
        env={**(env or {}), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )


def new_key(url: str, **limits) -> tuple[str, str]:
    """(name, secret) of a fresh key, created in the database as `pagoda keys create` does."""
    engine = open_database(url)
    try:
        name = f"k-{uuid.uuid4().hex[:8]}"
        _, secret = store.create_key(engine, store.KeySpec(name=name, **limits))
    finally:
        engine.dispose()
    SECRETS.append(secret)
    return name, secret


def sdk(server: Server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)


def chat(client: openai.OpenAI, max_tokens: int = 2, **kwargs):
    return client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me a story"}],
        max_tokens=max_tokens,
        extra_body={"ignore_eos": True},
        **kwargs,
    )


def ledger(url: str, name: str) -> list[dict]:
    engine = open_database(url)
    try:
        with engine.connect() as c:
            query = (
                sa.select(store.usage)
                .join(store.api_keys)
                .where(store.api_keys.c.name == name)
                .order_by(store.usage.c.id)
            )
            return [dict(r) for r in c.execute(query).mappings()]
    finally:
        engine.dispose()


def wait_for(condition, timeout: float = 10.0, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(step)
    raise AssertionError("condition not met in time")


def key_state(**limits) -> KeyState:
    """A key as the server holds it, without a database: `limits` over no limits at all."""
    row = {"id": 1, "name": "k", "models": None, "rpm": None, "tpm": None,
           "max_concurrent": None, "budget_usd": None, "expires_at": None, "revoked_at": None,
           "spent_usd": 0.0}  # fmt: skip
    return KeyState.from_row({**row, **limits})


# -- the limits, without a server ------------------------------------------------------------


def test_windows_admit_exactly_their_limit_and_say_when_to_retry():
    key = key_state(rpm=10, tpm=1000)
    admitted = 0
    for i in range(64):
        try:
            key.admit(5, now=100.0 + i * 0.01)
            admitted += 1
        except Exception as exc:
            assert exc.status == 429 and exc.code == "rate_limit_exceeded"
            assert exc.headers["Retry-After"] == "60"  # the first request leaves at 160.0
    assert admitted == 10
    key.admit(5, now=160.01)  # a minute later, one slot is free again
    window = Window(100)
    take = window.take(90, now=0.0)
    assert not window.fits(20) and window.wait(20, now=30.0) == 30.0
    window.correct(take, 40)  # the request used less than it held
    assert window.fits(20) and window.remaining() == 60
    assert window.wait(101, now=0.0) is None  # larger than the limit: never
    assert [duration(s) for s in (0.02, 6.5, 60.0)] == ["20ms", "6.5s", "1m0s"]


def test_a_refunded_request_leaves_nothing_behind_in_the_reset_headers():
    """Before: a request taken back out of the windows (refused after admission) stayed in
    them as an empty take, and x-ratelimit-reset-* said when that take would leave: a key with
    nothing used was told to wait a minute, and one with a real request behind the refund was
    told a reset that freed nothing."""
    key = key_state(rpm=2, tpm=100)
    refunded = key.admit(10, now=100.0)
    for window, take in zip((key.requests, key.tokens), refunded):
        window.correct(take, 0)  # what Meter.refuse does
    headers = key.headers(now=101.0)
    assert headers["x-ratelimit-remaining-requests"] == "2"
    assert headers["x-ratelimit-reset-requests"] == headers["x-ratelimit-reset-tokens"] == "0ms"
    key.admit(10, now=130.0)
    headers = key.headers(now=131.0)  # the request at 130.0 leaves at 190.0, not 160.0
    assert headers["x-ratelimit-reset-requests"] == headers["x-ratelimit-reset-tokens"] == "59s"
    assert headers["x-ratelimit-remaining-tokens"] == "90"


@dataclass
class Used:
    """What a generation reports: its prompt and completion tokens so far."""

    prompt_tokens: int
    completion_tokens: int = 0


def test_a_request_refused_after_admission_is_taken_back_once_its_answer_is_sent():
    """A 4xx after admission (an engine that refuses a request's grammar): KeyAuth takes it
    back out of the windows as its response starts, then its last bytes release its slot and
    hold. Before: that release put its prompt back into the tpm window, where the refused
    request then counted against the key for a minute."""
    key = key_state(tpm=1000, budget=1.0)
    gateway = Gateway(prices={MODEL: Pricing(**PRICING)})
    meter = Meter(key, "/v1/chat/completions", gateway.cost)
    meter.admit(MODEL, 100, 400)
    meter.track(Used(prompt_tokens=100))
    assert key.tokens.used == 500 and key.held_usd == pytest.approx(0.9)
    meter.refuse()  # the 400's response starts
    meter.release()  # its last bytes are sent
    gateway.finish(meter, 400, completed=True)
    assert (key.tokens.used, key.requests.used, key.in_flight) == (0, 0, 0)
    assert key.held_usd == key.pending_usd == 0.0 and gateway.rows == []


# -- the database and the commands ------------------------------------------------------------


def test_schema_is_versioned_and_migrated_on_first_use(tmp_path):
    url = f"sqlite:///{tmp_path / 'new' / 'keys.db'}"
    engine = open_database(url)
    current, head = schema_version(engine)
    assert current == head == "0002"
    assert {"api_keys", "usage", "alembic_version"} <= set(sa.inspect(engine).get_table_names())
    engine.dispose()
    open_database(url).dispose()  # a second start finds it migrated


@pytest.mark.parametrize(
    "url", ["bogus://x", "sqlite+nodriver:///x.db", "://x", "postgresql://u:pw@h:port/db"]
)
def test_a_database_url_that_names_no_database_is_one_line(url):
    """Before: `--database bogus://x` ended `pagoda keys list` and `pagoda serve` in
    SQLAlchemy's NoSuchModuleError traceback (`://x` in its ArgumentError's, a port that is not
    a number in a ValueError's)."""
    for command in (["keys", "list"], ["serve", "--model", "unused"]):
        run = [sys.executable, "-m", "pagoda", *command, "--database", url]
        result = subprocess.run(run, capture_output=True, text=True, timeout=120)
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr
        assert "cannot open the database" in result.stderr.splitlines()[-1]


def create_keys_at_once(url: str, count: int = 4) -> list[subprocess.CompletedProcess]:
    """`pagoda keys create` in `count` processes started together on `url`."""
    command = [sys.executable, "-m", "pagoda", "keys", "create", "--database", url, "--name"]
    processes = [
        subprocess.Popen([*command, f"at-once-{i}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for i in range(count)
    ]
    return [
        subprocess.CompletedProcess(p.args, p.wait(120), *map(bytes.decode, p.communicate()))
        for p in processes
    ]


def test_processes_starting_on_a_new_sqlite_file_at_once_all_migrate_it(tmp_path):
    """Before: each created the tables (pysqlite runs DDL outside a transaction), and those
    that lost the race failed with `table alembic_version already exists`."""
    for attempt in range(2):
        url = f"sqlite:///{tmp_path / f'new-{attempt}.db'}"
        for done in create_keys_at_once(url):
            assert done.returncode == 0, done.stderr
        engine = open_database(url)
        assert len(store.list_keys(engine)) == 4
        engine.dispose()


def test_a_database_a_newer_pagoda_migrated_is_refused_in_one_line(tmp_path):
    """After a downgrade of pagoda, its database is at a revision this code does not know.
    Before: `pagoda keys list` and `pagoda serve` ended in Alembic's CommandError traceback."""
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    engine = open_database(url)
    with engine.begin() as c:
        c.execute(sa.text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    for command in (["keys", "list"], ["serve", "--model", "unused"]):
        run = [sys.executable, "-m", "pagoda", *command, "--database", url]
        result = subprocess.run(run, capture_output=True, text=True, timeout=120)
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr
        last = result.stderr.splitlines()[-1]
        assert "revision 9999" in last and "a newer pagoda migrated it" in last, last


def test_cli_prints_the_key_once_and_stores_only_its_hash(tmp_path):
    env = {"PAGODA_STATE_DIR": str(tmp_path)}  # the default database: a file created here
    created = pagoda("keys", "create", "--name", "ci", "--models", "a,b", "--rpm", "5",
                     "--budget", "2.5", "--expires", "2099-01-01", env=env)  # fmt: skip
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"sk-pagoda-[A-Za-z0-9_-]{32,}", secret)
    assert created.stdout.count(secret) == 1
    database = tmp_path / "pagoda.db"
    assert secret.encode() not in database.read_bytes()
    row = store.get_key(open_database(f"sqlite:///{database}"), "ci")
    assert row["key_hash"] == hashlib.sha256(secret.encode()).hexdigest()
    assert row["models"] == ["a", "b"] and row["rpm"] == 5 and row["budget_usd"] == 2.5

    listed = pagoda("keys", "list", "--json", env=env)
    assert listed.returncode == 0 and secret not in listed.stdout
    (key,) = json.loads(listed.stdout)
    assert key["name"] == "ci" and key["fingerprint"] == row["key_hash"][:8]
    assert "key_hash" not in key and key["revoked_at"] is None

    assert pagoda("keys", "revoke", "ci", env=env).returncode == 0
    again = pagoda("keys", "revoke", "ci", env=env)
    assert again.returncode == 1 and "revoked already" in again.stderr
    taken = pagoda("keys", "create", "--name", "ci", env=env)
    assert taken.returncode == 1 and "exists already" in taken.stderr
    bad = pagoda("keys", "create", "--name", "x", "--rpm", "0", "--expires", "soon", env=env)
    assert bad.returncode == 1 and "rpm" in bad.stderr
    report = pagoda("usage", "--json", "--since", "2020-01-01", env=env)
    assert report.returncode == 0 and json.loads(report.stdout) == []
    for refused in (
        ["--budget", "inf"],  # saved, it made `keys list --json` print Infinity
        ["--models", ""],  # an empty $MODELS: no model, not every model
        ["--expires", "9999-12-31T23:00:00-05:00"],  # past year 9999 in UTC
    ):
        bad = pagoda("keys", "create", "--name", "y", *refused, env=env)
        assert bad.returncode == 1 and bad.stderr.startswith("error: "), (refused, bad.stderr)
        assert "Traceback" not in bad.stderr
    far = pagoda("usage", "--since", "0001-01-01T00:30:00+01:00", env=env)
    assert (
        far.returncode == 1 and far.stderr.startswith("error: ") and "Traceback" not in far.stderr
    )
    assert json.loads(pagoda("keys", "list", "--json", env=env).stdout)[0]["name"] == "ci"


def test_a_command_on_a_locked_sqlite_file_fails_in_one_line(tmp_path):
    """Another writer holds the file past the busy timeout. Before: SQLAlchemy's
    OperationalError traceback, with the statement and its parameters (the new key's hash)."""
    path = tmp_path / "keys.db"
    open_database(f"sqlite:///{path}").dispose()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        for command in (["keys", "create", "--name", "a"], ["keys", "revoke", "a"]):
            result = pagoda(*command, "--database", str(path))
            assert result.returncode == 1
            assert result.stderr == "error: the database failed: database is locked\n"
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_times_with_an_offset_are_the_instant_they_name(tmp_path):
    """`--expires` and `usage --since` with a UTC offset, through the CLI on a real SQLite file
    (which keeps a time's wall clock and drops its offset)."""
    env = {"PAGODA_STATE_DIR": str(tmp_path)}
    plus5 = timezone(timedelta(hours=5))
    an_hour_ago = datetime.now(timezone.utc) - timedelta(hours=1)
    created = pagoda("keys", "create", "--name", "tz", "--expires",
                     an_hour_ago.astimezone(plus5).isoformat(), env=env)  # fmt: skip
    assert created.returncode == 0, created.stderr
    engine = open_database(f"sqlite:///{tmp_path / 'pagoda.db'}")
    row = store.get_key(engine, "tz")
    assert abs(store.utc(row["expires_at"]) - an_hour_ago) < timedelta(seconds=1)
    assert KeyState.from_row(row).expires_at < time.time()  # the server refuses it: expired
    at = datetime.now(timezone.utc)
    usage_row = {"key_id": row["id"], "model": MODEL, "endpoint": "/v1/chat/completions",
                 "input_tokens": 1, "output_tokens": 1, "images": 0, "cost_usd": 0.0,
                 "http_status": 200, "outcome": "completed", "latency_ms": 1.0,
                 "created_at": at}  # fmt: skip
    store.write_usage(engine, [usage_row])
    engine.dispose()
    for since, rows in [(at - timedelta(minutes=1), 1), (at + timedelta(minutes=1), 0)]:
        for zone in (plus5, timezone(timedelta(hours=-5))):
            report = pagoda(
                "usage", "--json", "--since", since.astimezone(zone).isoformat(), env=env
            )
            assert report.returncode == 0, report.stderr
            assert len(json.loads(report.stdout)) == rows, since.astimezone(zone)


# -- a real server on a SQLite file -----------------------------------------------------------


@pytest.fixture(scope="module")
def catalog(tiny_models, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("catalog") / "models.yaml"
    entry = {
        "id": MODEL,
        "kind": "chat",
        "source": str(tiny_models["llama"]),
        "max_model_len": 512,
        "engine": {"dtype": "float32"},
        "pricing": PRICING,
    }
    path.write_text(json.dumps({"models": [entry]}))  # JSON is YAML
    return path


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('db') / 'keys.db'}"


def start_server(catalog: Path, db: str) -> Server:
    args = ["--catalog", str(catalog), "--database", db, "--admin-key", ADMIN]
    return Server([*args, "--api-key", STATIC]).wait_ready()


@pytest.fixture(scope="module")
def server(catalog, db):
    srv = start_server(catalog, db)
    yield srv
    assert srv.stop() == 0, srv.log()
    log = srv.log()
    assert not [s for s in [*SECRETS, STATIC, ADMIN] if s in log]  # keys are never logged


def test_rpm_the_eleventh_request_gets_429_with_openai_headers(server, db):
    _, key = new_key(db, rpm=10)
    client = sdk(server, key)
    for i in range(10):
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1
        )
        assert raw.headers["x-ratelimit-limit-requests"] == "10"
        assert raw.headers["x-ratelimit-remaining-requests"] == str(9 - i)
        assert re.fullmatch(r"\d+(\.\d+)?(ms|s)|1m0s", raw.headers["x-ratelimit-reset-requests"])
    with pytest.raises(openai.RateLimitError) as caught:
        chat(client)
    response = caught.value.response
    assert response.json()["error"]["code"] == "rate_limit_exceeded"
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert 1 <= int(response.headers["retry-after"]) <= 60
    assert response.headers["x-ratelimit-remaining-requests"] == "0"


def test_64_simultaneous_requests_against_rpm_10_admit_exactly_10(server, db):
    _, key = new_key(db, rpm=10)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}

    async def run() -> list[int]:
        async with httpx.AsyncClient(
            base_url=server.url,
            headers={"Authorization": f"Bearer {key}"},
            timeout=120,
            limits=httpx.Limits(max_connections=64),
        ) as client:
            replies = await asyncio.gather(
                *(client.post("/v1/chat/completions", json=body) for _ in range(64))
            )
        return [r.status_code for r in replies]

    statuses = asyncio.run(run())
    assert statuses.count(200) == 10 and statuses.count(429) == 54


def test_a_key_sees_and_uses_only_its_models(server, db):
    _, other = new_key(db, models=["some-other-model"])
    with pytest.raises(openai.NotFoundError) as caught:
        chat(sdk(server, other))
    assert caught.value.response.json()["error"]["code"] == "model_not_found"
    assert [m.id for m in sdk(server, other).models.list()] == []
    with pytest.raises(openai.NotFoundError):
        sdk(server, other).models.retrieve(MODEL)
    _, allowed = new_key(db, models=[MODEL])
    assert [m.id for m in sdk(server, allowed).models.list()] == [MODEL]
    assert chat(sdk(server, allowed)).usage.completion_tokens == 2


def test_bad_revoked_and_expired_keys_get_401(server, db):
    url = f"{server.url}/v1/models"
    for header in ("", "Bearer", "Bearer sk-pagoda-unknown", "Basic abc", f"Bearer {STATIC}x"):
        r = httpx.get(url, headers={"Authorization": header} if header else {})
        assert r.status_code == 401, header
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert r.json()["error"]["code"] == "invalid_api_key"
    name, key = new_key(db)
    assert chat(sdk(server, key)).usage.completion_tokens == 2
    engine = open_database(db)
    store.revoke_key(engine, name)  # what `pagoda keys revoke` does, while the server runs
    revoked = time.monotonic()
    wait_for(lambda: httpx.get(url, headers={"Authorization": f"Bearer {key}"}).status_code == 401)
    assert time.monotonic() - revoked < 1.0
    with pytest.raises(openai.AuthenticationError):
        chat(sdk(server, key))
    _, past = new_key(db, expires="2020-01-01")
    r = httpx.get(url, headers={"Authorization": f"Bearer {past}"})
    assert r.status_code == 401 and "expired" in r.json()["error"]["message"]
    _, soon = new_key(db, expires=datetime.fromtimestamp(time.time() + 3, timezone.utc))
    wait_for(lambda: httpx.get(url, headers={"Authorization": f"Bearer {soon}"}).status_code == 200)
    wait_for(lambda: httpx.get(url, headers={"Authorization": f"Bearer {soon}"}).status_code == 401)
    engine.dispose()


def test_a_new_key_works_within_a_second_and_static_keys_have_no_limits(server, db):
    _, key = new_key(db, rpm=1)
    created = time.monotonic()
    ok = {"Authorization": f"Bearer {key}"}
    wait_for(lambda: httpx.get(f"{server.url}/v1/models", headers=ok).status_code == 200)
    assert time.monotonic() - created < 1.0
    static = sdk(server, STATIC)
    for _ in range(3):
        raw = static.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1
        )
        assert not [h for h in RATE_HEADERS if h in raw.headers]


def test_tpm_counts_prompt_plus_max_tokens_then_the_real_count(server, db):
    _, key = new_key(db, tpm=500)
    client = sdk(server, key)
    auth = {"Authorization": f"Bearer {key}"}

    def remaining() -> int:
        headers = httpx.get(f"{server.url}/v1/models", headers=auth).headers
        return int(headers["x-ratelimit-remaining-tokens"])

    first = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me a story"}],
        max_tokens=100,
        extra_body={"ignore_eos": True},
    )
    used = first.parse().usage.total_tokens
    prompt = used - 100
    assert int(first.headers["x-ratelimit-remaining-tokens"]) == 500 - used
    # a stream holds prompt + max_tokens while it runs; cut by the client, only what it made
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story"}],
            "max_tokens": 300, "stream": True, "ignore_eos": True}  # fmt: skip
    url = f"{server.url}/v1/chat/completions"
    with httpx.stream("POST", url, headers=auth, json=body, timeout=60) as r:
        assert int(r.headers["x-ratelimit-remaining-tokens"]) == 500 - used - prompt - 300
        for _ in zip(range(3), r.iter_lines()):
            pass
    left = wait_for(lambda: (n := remaining()) > 500 - used - prompt - 300 and n)
    assert left < 500 - used - prompt
    with pytest.raises(openai.RateLimitError) as caught:  # one token more than is left
        chat(client, max_tokens=left - prompt + 1)
    error = caught.value.response
    assert error.json()["error"]["type"] == "tokens" and "retry-after" in error.headers
    with pytest.raises(openai.RateLimitError) as caught:  # larger than the limit alone
        chat(client, max_tokens=500 - prompt + 1)
    assert "larger than the limit" in caught.value.response.json()["error"]["message"]
    assert "retry-after" not in caught.value.response.headers


def test_max_concurrent_refuses_while_a_stream_runs(server, db):
    _, key = new_key(db, max_concurrent=1)
    client = sdk(server, key)
    stream = chat(client, max_tokens=300, stream=True)
    next(iter(stream))  # the stream is running
    with pytest.raises(openai.RateLimitError) as caught:
        chat(client)
    assert caught.value.response.headers["retry-after"] == "1"
    assert caught.value.response.json()["error"]["code"] == "rate_limit_exceeded"
    assert sum(1 for _ in stream) > 0
    assert chat(client).usage.completion_tokens == 2  # the slot is free again


def test_max_concurrent_slot_is_free_once_the_answer_is_read(server, db):
    """A client that sends its next request as soon as it has read an answer (a stream's
    `[DONE]`, a JSON body) is never refused by its own previous request."""
    _, key = new_key(db, max_concurrent=1)
    client = sdk(server, key)
    for _ in range(8):
        assert sum(1 for _ in chat(client, max_tokens=2, stream=True)) > 0
        assert chat(client, max_tokens=1).usage.completion_tokens == 1


def test_budget_is_charged_at_catalog_prices_then_refused(server, db):
    name, key = new_key(db, budget=0.05)
    client = sdk(server, key)
    spent = 0.0
    while spent < 0.05:
        usage = chat(client, max_tokens=4).usage
        spent += usage.prompt_tokens * 0.001 + usage.completion_tokens * 0.002
    with pytest.raises(openai.RateLimitError) as caught:
        chat(client)
    error = caught.value.response.json()["error"]
    assert error["code"] == "insufficient_quota" and error["type"] == "insufficient_quota"
    rows = wait_for(lambda: ledger(db, name))
    assert sum(r["cost_usd"] for r in rows) == pytest.approx(spent)
    engine = open_database(db)
    assert store.get_key(engine, name)["spent_usd"] == pytest.approx(spent)
    engine.dispose()


def test_requests_sent_at_once_near_the_budget_cross_it_by_one_at_most(server, db):
    """Each admitted request holds the most it may cost until it ends. Before: 16 requests
    sent at once to a key with a $0.05 budget were all admitted on the same (nil) spend and
    spent $0.46."""
    name, key = new_key(db, budget=0.05)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story"}],
            "max_tokens": 4, "ignore_eos": True}  # fmt: skip

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(
            base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=120
        ) as client:
            return await asyncio.gather(
                *(client.post("/v1/chat/completions", json=body) for _ in range(16))
            )

    replies = asyncio.run(run())
    served = [r for r in replies if r.status_code == 200]
    refused = [r for r in replies if r.status_code != 200]
    assert {r.json()["error"]["code"] for r in refused} == {"insufficient_quota"}
    costs = [r.json()["usage"]["prompt_tokens"] * 0.001 + 4 * 0.002 for r in served]
    assert sum(costs) - max(costs) < 0.05  # only the last admitted may cross the budget
    rows = wait_for(lambda: (rows := ledger(db, name)) and len(rows) == len(served) and rows)
    assert sum(r["cost_usd"] for r in rows) == pytest.approx(sum(costs))


def test_the_sdk_does_not_retry_a_429_that_retrying_cannot_help(server, db):
    """The OpenAI SDK (and LangChain over it) retries a 429 twice by default, after a backoff:
    a spent budget or a request larger than the key's tpm would be sent three times and the
    caller kept waiting for the same answer. `x-should-retry: false` stops it; a 429 that
    waiting cures keeps its Retry-After and no such header."""
    _, spent = new_key(db, budget=0.0)
    _, small = new_key(db, tpm=50)
    for key in (spent, small):
        retrying = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key)  # max_retries=2
        before = _refused(server)
        with pytest.raises(openai.RateLimitError) as caught:
            chat(retrying, max_tokens=100)
        assert _refused(server) == before + 1
        assert caught.value.response.headers["x-should-retry"] == "false"
    _, one = new_key(db, max_concurrent=1)
    client = sdk(server, one)
    stream = chat(client, max_tokens=300, stream=True)
    next(iter(stream))
    with pytest.raises(openai.RateLimitError) as caught:
        chat(client)
    assert "x-should-retry" not in caught.value.response.headers
    stream.close()


def _refused(server: Server) -> float:
    """The 429s the server has answered on /v1/chat/completions."""
    metrics = httpx.get(f"{server.url}/metrics").text
    line = 'pagoda:http_responses_total{route="/v1/chat/completions",status="429"}'
    return next((float(m.split()[-1]) for m in metrics.splitlines() if m.startswith(line)), 0.0)


def test_ledger_equals_the_usage_clients_received_and_usage_command_reports_it(server, db):
    name, key = new_key(db)
    client = sdk(server, key)
    received = [chat(client, max_tokens=3).usage for _ in range(2)]
    parts = list(chat(client, max_tokens=5, stream=True, stream_options={"include_usage": True}))
    received.append(parts[-1].usage)
    completions = client.completions.create(model=MODEL, prompt=["a b", "c d e"], max_tokens=2)
    received.append(completions.usage)
    # a stream the client aborts is billed for what was produced
    with httpx.stream(
        "POST",
        f"{server.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "Tell me a story"}],
            "max_tokens": 400,
            "stream": True,
            "ignore_eos": True,
        },  # fmt: skip
        timeout=60,
    ) as r:
        got = [line for _, line in zip(range(4), r.iter_lines()) if line.startswith("data: ")]
    rows = wait_for(lambda: (rows := ledger(db, name)) and len(rows) == 5 and rows)
    for row, usage in zip(rows[:4], received):
        assert (row["input_tokens"], row["output_tokens"]) == (
            usage.prompt_tokens,
            usage.completion_tokens,
        )
        assert row["outcome"] == "completed" and row["http_status"] == 200
        assert row["cost_usd"] == pytest.approx(
            usage.prompt_tokens * 0.001 + usage.completion_tokens * 0.002
        )
    aborted = rows[4]
    assert aborted["outcome"] == "aborted" and len(got) <= aborted["output_tokens"] < 400
    assert [r["endpoint"] for r in rows] == ["/v1/chat/completions"] * 3 + [
        "/v1/completions",
        "/v1/chat/completions",
    ]
    report = pagoda("usage", "--json", "--key", name, "--database", db)
    assert report.returncode == 0, report.stderr
    (line,) = json.loads(report.stdout)
    assert line["requests"] == 5 and line["model"] == MODEL
    assert line["input_tokens"] == sum(r["input_tokens"] for r in rows)
    assert line["output_tokens"] == sum(r["output_tokens"] for r in rows)
    assert line["cost_usd"] == pytest.approx(sum(r["cost_usd"] for r in rows))
    metrics = httpx.get(f"{server.url}/metrics").text
    labels = f'key_name="{name}",model_name="{MODEL}"'
    assert f'pagoda:key_requests_total{{{labels},status="200"}} 5.0' in metrics
    prompt = sum(r["input_tokens"] for r in rows)
    assert f"pagoda:key_prompt_tokens_total{{{labels}}} {prompt}.0" in metrics


def test_a_locked_sqlite_file_delays_the_ledger_but_refuses_no_key(server, db):
    """Another writer holding the SQLite file (an operator's sqlite3 shell, a VACUUM) past the
    busy timeout: the keys can still be read, so requests go on and the rows wait. Before: the
    failed ledger write closed the server to every database key with 503 until the lock went."""
    name, key = new_key(db)
    client = sdk(server, key)
    assert chat(client, max_tokens=1).usage.completion_tokens == 1  # the server knows the key
    served = 1
    holder = sqlite3.connect(db.removeprefix("sqlite:///"), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # the write lock, held past busy_timeout (5 s)
    try:
        held = time.monotonic()
        while time.monotonic() - held < 7.0:
            assert chat(client, max_tokens=1).usage.completion_tokens == 1
            served += 1
            time.sleep(0.2)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    rows = wait_for(lambda: (rows := ledger(db, name)) and len(rows) == served and rows)
    assert {(r["http_status"], r["output_tokens"]) for r in rows} == {(200, 1)}
    assert "database is locked" in server.log()


def test_admin_api(server, db):
    admin = httpx.Client(
        base_url=f"{server.url}/admin", headers={"Authorization": f"Bearer {ADMIN}"}
    )
    for headers in ({}, {"Authorization": f"Bearer {STATIC}"}):
        r = httpx.get(f"{server.url}/admin/keys", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = admin.post("/keys", json={"name": "from-admin", "rpm": 3, "models": [MODEL]})
    assert r.status_code == 201, r.text
    key = r.json()["key"]
    SECRETS.append(key)
    assert re.fullmatch(r"sk-pagoda-[A-Za-z0-9_-]{32,}", key)
    assert chat(sdk(server, key)).usage.completion_tokens == 2  # usable at once
    listed = admin.get("/keys")
    assert key not in listed.text and "key_hash" not in listed.text
    assert "from-admin" in [k["name"] for k in listed.json()["data"]]
    assert admin.post("/keys", json={"name": "from-admin"}).status_code == 409
    bad = admin.post("/keys", json={"name": "x", "rpm": -1})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "rpm"
    assert admin.post("/keys", json={"name": "x", "colour": "red"}).status_code == 400
    assert admin.delete("/keys/from-admin").status_code == 200
    with pytest.raises(openai.AuthenticationError):  # refused at once
        chat(sdk(server, key))
    assert admin.delete("/keys/nobody").status_code == 404
    usage = wait_for(lambda: admin.get("/usage", params={"key": "from-admin"}).json()["data"])
    assert usage[0]["requests"] == 1 and usage[0]["input_tokens"] > 0
    assert admin.get("/usage", params={"since": "yesterday"}).status_code == 400
    for body, param in (
        ({"name": "inf", "budget": "inf"}, "budget"),  # refused before anything is written
        ({"name": "far", "expires": "9999-12-31T23:00:00-05:00"}, "expires"),
        ({"name": "early", "expires": "0001-01-01T00:30:00+01:00"}, "expires"),
    ):
        r = admin.post("/keys", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert "inf" not in [k["name"] for k in admin.get("/keys").json()["data"]]
    far = {"since": "9999-12-31T23:00:00-05:00"}
    assert admin.get("/usage", params=far).status_code == 400
    # the admin key first, whatever the parameters; as a bearer token only
    assert httpx.get(f"{server.url}/admin/usage", params=far).status_code == 401
    basic = httpx.get(f"{server.url}/admin/keys", headers={"Authorization": f"Basic {ADMIN}"})
    assert basic.status_code == 401


# the first token ends the sequence: a request uses a prompt token or two and one generated,
# while it holds 480 tokens (at the catalog's prices, $0.96) until its answer is complete
EARLY_END = {"model": MODEL, "prompt": "a", "max_tokens": 480, "logit_bias": {str(EOS_ID): 100}}


def next_request_on_done(server: Server, key: str, times: int, follow: list[str]) -> list[str]:
    """`times` streams, each followed as soon as its `[DONE]` is read, its response still
    open, by a request to `follow[i % len(follow)]`: the errors those requests got."""
    url = f"{server.url}/v1/completions"
    errors = []
    auth = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=server.url, headers=auth, timeout=60) as client:
        client.get("/v1/models")  # a connection ready for the requests sent on [DONE]
        for i in range(times):
            with httpx.stream("POST", url, headers=auth, json={**EARLY_END, "stream": True}) as r:
                assert r.status_code == 200, r.read()
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        break
                path = follow[i % len(follow)]
                body = {"prompt": "a"} if path == "/tokenize" else EARLY_END
                reply = client.post(path, json=body)
                if reply.status_code != 200:
                    errors.append(reply.text)
    return errors


def test_a_streams_budget_hold_ends_with_its_done_event(server, db):
    """A budget that fits one request's hold at a time: a client that reads a stream's
    `[DONE]` and sends its next request at once must find the hold replaced by what the stream
    cost. Before: the hold stayed until the response object ended, after `[DONE]` was sent,
    and the next request got 429 insufficient_quota now and then on a budget nearly unspent
    (1 and 7 of 40 in two runs). /tokenize is admitted without tokenizing first."""
    name, key = new_key(db, budget=0.95)
    assert next_request_on_done(server, key, 40, ["/v1/completions", "/tokenize"]) == []
    rows = wait_for(lambda: (rows := ledger(db, name)) and len(rows) == 80 and rows)
    assert sum(r["cost_usd"] for r in rows) < 0.2


def test_a_streams_tpm_hold_ends_with_its_done_event(server, db):
    """The same for the tokens a stream holds in its key's tpm window (its prompt and
    max_tokens) until it ends: a tpm of 960 fits one such hold (481 tokens), not two. Before:
    the next request got 429 on tokens now and then (7 of 80 in each of two runs)."""
    _, key = new_key(db, tpm=960)  # 160 requests of 2 tokens: the window keeps room for one hold
    assert next_request_on_done(server, key, 80, ["/v1/completions"]) == []


def test_keys_update_changes_limits_on_a_running_server_and_keeps_the_spend(server, db):
    """`pagoda keys update NAME` sets or clears (`none`) a key's limits in place: the same
    secret, the spend kept, on a running server within a second, as a revoke. Before: there
    was no way but to revoke the key and hand out a new secret."""
    name, key = new_key(db, models=["some-other-model"], rpm=2, budget=0.02)
    client = sdk(server, key)
    auth = {"Authorization": f"Bearer {key}"}

    def update(*options: str) -> subprocess.CompletedProcess:
        return pagoda("keys", "update", name, *options, "--database", db)

    with pytest.raises(openai.NotFoundError):
        chat(client)
    done = update("--models", f"{MODEL},some-other-model")
    assert done.returncode == 0, done.stderr
    assert f"updated key '{name}'" in done.stdout
    changed = time.monotonic()
    wait_for(lambda: httpx.get(f"{server.url}/v1/models/{MODEL}", headers=auth).status_code == 200)
    assert time.monotonic() - changed < 1.0
    spent = 0.0
    while True:  # the rpm (2, the GET above was one) or the budget, whichever comes first
        try:
            usage = chat(client, max_tokens=4).usage
        except openai.RateLimitError as exc:
            code = exc.response.json()["error"]["code"]
            assert code in ("rate_limit_exceeded", "insufficient_quota")
            break
        spent += usage.prompt_tokens * 0.001 + usage.completion_tokens * 0.002
    done = update("--rpm", "none", "--budget", "none", "--tpm", "100000", "--expires", "2099-01-01")
    assert done.returncode == 0, done.stderr
    wait_for(lambda: "x-ratelimit-limit-requests" not in httpx.get(
        f"{server.url}/v1/models", headers=auth).headers)  # fmt: skip
    for _ in range(4):  # no rpm, no budget: more than either allowed before
        usage = chat(client, max_tokens=4).usage
        spent += usage.prompt_tokens * 0.001 + usage.completion_tokens * 0.002
    engine = open_database(db)
    # the ledger's spend, before the update and after
    row = wait_for(
        lambda: (row := store.get_key(engine, name))["spent_usd"] == pytest.approx(spent) and row
    )
    engine.dispose()
    assert row["key_hash"] == hashlib.sha256(key.encode()).hexdigest()
    assert (row["rpm"], row["tpm"], row["budget_usd"]) == (None, 100000, None)
    assert row["models"] == [MODEL, "some-other-model"]
    assert store.utc(row["expires_at"]) == datetime(2099, 1, 1, tzinfo=timezone.utc)
    # a budget below the spend refuses at once; clearing the models lets every model through
    assert update("--budget", "0.01", "--models", "none").returncode == 0
    wait_for(lambda: admitted(server, key) == 429)
    (listed,) = [k for k in json.loads(pagoda("keys", "list", "--json", "--database", db).stdout)
                 if k["name"] == name]  # fmt: skip
    assert listed["models"] is None and listed["budget_usd"] == 0.01
    assert listed["spent_usd"] == pytest.approx(spent)
    for options, error in [
        ((), "nothing to change"),
        (("--rpm", "0"), "rpm"),
        (("--rpm", "many"), "rpm"),
        (("--budget", "inf"), "budget"),
        (("--models", ""), "models"),
        (("--expires", "soon"), "expires"),
    ]:
        bad = update(*options)
        assert bad.returncode == 1 and bad.stderr.startswith("error: "), (options, bad.stderr)
        assert error in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    unknown = pagoda("keys", "update", "nobody", "--rpm", "1", "--database", db)
    assert unknown.returncode == 1 and "no key named 'nobody'" in unknown.stderr
    assert pagoda("keys", "revoke", name, "--database", db).returncode == 0
    revoked = update("--budget", "none")
    assert revoked.returncode == 1 and "revoked" in revoked.stderr


def admitted(server: Server, key: str) -> int:
    """The status of a /tokenize request: admitted as any request, but free."""
    auth = {"Authorization": f"Bearer {key}"}
    return httpx.post(f"{server.url}/tokenize", headers=auth, json={"prompt": "a"}).status_code


def test_admin_api_updates_a_key(server, db):
    """PATCH /admin/keys/{name}: the fields given are set, null clears one, effective at once."""
    admin = httpx.Client(
        base_url=f"{server.url}/admin", headers={"Authorization": f"Bearer {ADMIN}"}
    )
    name, key = new_key(db, budget=0.0, rpm=5)
    assert admitted(server, key) == 429  # the budget is spent
    r = admin.patch(f"/keys/{name}", json={"budget": 1.5, "rpm": None, "max_concurrent": 2})
    assert r.status_code == 200, r.text
    entry = r.json()
    assert (entry["budget_usd"], entry["rpm"], entry["max_concurrent"]) == (1.5, None, 2)
    assert "key" not in entry and "key_hash" not in entry
    assert admitted(server, key) == 200  # at once
    assert httpx.patch(f"{server.url}/admin/keys/{name}", json={"rpm": 1}).status_code == 401
    bad = [({}, None), ({"rpm": 0}, "rpm"), ({"name": "a b"}, "name"), ({"name": None}, "name")]
    for body, param in bad:
        r = admin.patch(f"/keys/{name}", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert admin.patch("/keys/nobody", json={"rpm": 1}).status_code == 404
    assert admin.delete(f"/keys/{name}").status_code == 200
    assert admin.patch(f"/keys/{name}", json={"rpm": 1}).status_code == 409
    allowed = admin.request("PUT", f"/keys/{name}").headers["allow"]
    assert set(allowed.split(", ")) == {"PATCH", "DELETE"}  # Starlette's order is a set's


def test_a_key_renamed_and_its_spend_reset(server, db, tmp_path):
    """`pagoda keys update NAME --reset-spend` starts a new budget period: the key's spend is
    0 and the server admits it again at once, the ledger keeps its rows; `--rename` (PATCH
    `name`) gives it a new name, same secret. Before: neither existed (a spent budget could
    only be raised, a name never changed)."""
    name, key = new_key(db, budget=0.003)
    client = sdk(server, key)
    while admitted(server, key) == 200:
        chat(client, max_tokens=2)
    rows = wait_for(lambda: ledger(db, name))
    reset = pagoda("keys", "update", name, "--reset-spend", "--database", db)
    assert reset.returncode == 0, reset.stderr
    assert "spent $0" in reset.stdout
    wait_for(lambda: admitted(server, key) == 200)  # the server's next round reads it
    assert len(ledger(db, name)) >= len(rows)  # the ledger keeps what was spent

    renamed = pagoda("keys", "update", name, "--rename", f"{name}-2", "--database", db)
    assert renamed.returncode == 0, renamed.stderr
    assert ledger(db, f"{name}-2") and admitted(server, key) == 200
    taken, _ = new_key(db)
    clash = pagoda("keys", "update", f"{name}-2", "--rename", taken, "--database", db)
    assert clash.returncode == 1 and "exists already" in clash.stderr
    admin = httpx.Client(
        base_url=f"{server.url}/admin", headers={"Authorization": f"Bearer {ADMIN}"}
    )
    r = admin.patch(f"/keys/{name}-2", json={"name": name, "reset_spend": True})
    assert r.status_code == 200 and r.json()["name"] == name, r.text
    assert admin.patch(f"/keys/{name}", json={"name": taken}).status_code == 409


def _set_period_end(url: str, name: str, when: datetime) -> None:
    """As if the key's budget period had ended at `when`."""
    engine = open_database(url)
    try:
        with engine.begin() as c:
            c.execute(
                store.api_keys.update()
                .where(store.api_keys.c.name == name)
                .values(budget_reset_at=when)
            )
    finally:
        engine.dispose()


def test_a_budget_period_ends_and_the_server_admits_the_key_again(server, db):
    """`--budget-period`: once the period ends, the server's next round starts the next one,
    spend 0, the ledger kept. Before: only `--reset-spend` (a cron job) did."""
    name, key = new_key(db, budget=0.003, budget_period="1h")
    client = sdk(server, key)
    while admitted(server, key) == 200:
        chat(client, max_tokens=2)
    refused = client.with_options(max_retries=0)
    with pytest.raises(openai.RateLimitError) as caught:
        chat(refused)
    assert caught.value.code == "insufficient_quota"
    assert "has used its budget of $0.003. It starts again at 20" in caught.value.message
    rows = wait_for(lambda: ledger(db, name))
    ended = datetime.now(timezone.utc) - timedelta(hours=2, minutes=30)
    _set_period_end(db, name, ended)
    wait_for(lambda: admitted(server, key) == 200)
    engine = open_database(db)
    try:
        row = store.get_key(engine, name)
    finally:
        engine.dispose()
    # the periods that passed are skipped: the next end is the first past now
    assert store.as_utc(row["budget_reset_at"]) == store.as_utc(ended) + timedelta(hours=3)
    assert row["spent_usd"] < 0.003 and len(ledger(db, name)) >= len(rows)


def test_budget_periods_reset_a_key_once_and_end_on_the_calendar(tmp_path):
    def at(*when: int) -> datetime:
        return datetime(*when, tzinfo=timezone.utc)

    assert store.period_end(at(2026, 1, 31, 10), "1mo") == at(2026, 2, 28, 10)
    assert store.period_end(at(2028, 1, 31), "1mo") == at(2028, 2, 29)
    assert store.period_end(at(2026, 12, 15), "13mo") == at(2028, 1, 15)
    assert store.period_end(at(2026, 12, 15), "12h") == at(2026, 12, 15, 12)
    assert store.period_end(at(2026, 12, 15), "2w") == at(2026, 12, 29)
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    engine = open_database(url)
    try:
        row, _ = store.create_key(engine, store.KeySpec(name="p", budget=1.0, budget_period="1d"))
        ends = store.as_utc(datetime.fromisoformat(row["budget_reset_at"]))
        assert abs(ends - (datetime.now(timezone.utc) + timedelta(days=1))) < timedelta(minutes=1)
        store.create_key(engine, store.KeySpec(name="q", budget=1.0))  # no period: kept
        store.write_usage(engine, [_usage_row(engine, "p", 0.5), _usage_row(engine, "q", 0.5)])
        now = datetime.now(timezone.utc)
        _set_period_end(url, "p", now - timedelta(days=2, hours=1))
        # two servers' rounds: the first resets it, the second finds nothing due
        assert store.reset_budgets(engine, now) == 1
        assert store.reset_budgets(engine, now) == 0
        p, q = store.get_key(engine, "p"), store.get_key(engine, "q")
        assert (p["spent_usd"], q["spent_usd"]) == (0.0, 0.5)
        assert store.as_utc(p["budget_reset_at"]) == now - timedelta(days=2, hours=1) + timedelta(
            days=3
        )
        cleared = store.update_key(engine, "p", store.KeyUpdate(budget_period=None))
        assert cleared["budget_period"] is None and cleared["budget_reset_at"] is None
    finally:
        engine.dispose()


def _usage_row(engine: sa.Engine, name: str, cost: float) -> dict:
    return {
        "key_id": store.get_key(engine, name)["id"],
        "model": MODEL,
        "endpoint": "/v1/chat/completions",
        "input_tokens": 1,
        "output_tokens": 1,
        "images": 0,
        "cost_usd": cost,
        "http_status": 200,
        "outcome": "completed",
        "latency_ms": 1.0,
        "created_at": datetime.now(timezone.utc),
    }


def test_the_budget_period_on_the_command_line_and_the_admin_api(server, db):
    created = pagoda(
        "keys",
        "create",
        "--name",
        "monthly",
        "--budget",
        "5",
        "--budget-period",
        "1mo",
        "--database",
        db,
    )
    assert created.returncode == 0, created.stderr
    assert "budget $5; period 1mo, next from 20" in created.stdout
    listed = pagoda("keys", "list", "--json", "--database", db)
    (row,) = [r for r in json.loads(listed.stdout) if r["name"] == "monthly"]
    assert row["budget_period"] == "1mo" and row["budget_reset_at"].endswith("+00:00")
    bad = pagoda("keys", "update", "monthly", "--budget-period", "3x", "--database", db)
    assert bad.returncode == 1 and "budget_period" in bad.stderr
    cleared = pagoda("keys", "update", "monthly", "--budget-period", "none", "--database", db)
    assert cleared.returncode == 0 and "period" not in cleared.stdout
    admin = httpx.Client(
        base_url=f"{server.url}/admin", headers={"Authorization": f"Bearer {ADMIN}"}
    )
    r = admin.patch("/keys/monthly", json={"budget_period": "1y"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "budget_period", r.text
    r = admin.patch("/keys/monthly", json={"budget_period": "7d"})
    assert r.status_code == 200 and r.json()["budget_period"] == "7d", r.text


def test_a_database_of_the_first_schema_gets_the_budget_period_columns(tmp_path):
    """A database made before budget periods (revision 0001) is migrated with its keys."""
    from alembic import command

    from pagoda.server.keys.database import _alembic_config

    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = sa.create_engine(url)
    config = _alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")
        connection.exec_driver_sql(
            "INSERT INTO api_keys (name, key_hash, fingerprint, spent_usd, created_at) "
            "VALUES ('old', 'h', 'h', 0.25, '2026-01-01 00:00:00')"
        )
    engine.dispose()
    engine = open_database(url)
    try:
        assert schema_version(engine) == ("0002", "0002")
        old = store.get_key(engine, "old")
        assert (old["spent_usd"], old["budget_period"], old["budget_reset_at"]) == (
            0.25,
            None,
            None,
        )
    finally:
        engine.dispose()


def test_the_ledger_survives_a_restart(catalog, db, server):
    name, key = new_key(db, budget=100.0)
    usage = chat(sdk(server, key), max_tokens=3).usage
    assert server.stop() == 0  # flushed on shutdown, not only by the periodic round
    (row,) = ledger(db, name)
    assert (row["input_tokens"], row["output_tokens"]) == (usage.prompt_tokens, 3)
    again = start_server(catalog, db)
    try:
        assert chat(sdk(again, key)).usage.completion_tokens == 2
        assert len(wait_for(lambda: (rows := ledger(db, name)) and len(rows) == 2 and rows)) == 2
    finally:
        assert again.stop() == 0
    assert key not in again.log()


def test_a_request_the_engine_failed_is_recorded_but_billed_nothing(catalog, db):
    """Its client got a 503 and no usage. Before: the row billed the prompt and any tokens
    made until the engine stopped, against the key's budget, and they stayed in its tpm."""
    own = start_server(catalog, db)  # its engine is killed: not the module's server
    try:
        name, key = new_key(db, tpm=1000, budget=1.0)
        auth = {"Authorization": f"Bearer {key}"}
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story"}],
                "max_tokens": 480, "ignore_eos": True}  # fmt: skip
        replies = []
        url = f"{own.url}/v1/chat/completions"
        thread = threading.Thread(
            target=lambda: replies.append(httpx.post(url, headers=auth, json=body, timeout=60))
        )
        # the engine stopped before the request, so that it cannot end before the kill (its
        # prompt was billed before, tokens made or not)
        engine_pid = own.engine_pid()
        os.kill(engine_pid, signal.SIGSTOP)
        thread.start()
        time.sleep(1.0)  # admitted and sent to the engine
        os.kill(engine_pid, signal.SIGKILL)
        thread.join(60)
        (reply,) = replies
        assert reply.status_code == 503 and "usage" not in reply.json()
        (row,) = wait_for(lambda: ledger(db, name))
        assert (row["http_status"], row["outcome"]) == (503, "error")
        assert (row["input_tokens"], row["output_tokens"], row["cost_usd"]) == (0, 0, 0.0)
        models = httpx.get(f"{own.url}/v1/models", headers=auth)
        assert models.headers["x-ratelimit-remaining-tokens"] == "1000"
    finally:
        own.stop()
    engine = open_database(db)
    assert store.get_key(engine, name)["spent_usd"] == 0.0
    engine.dispose()


def test_an_unreachable_database_fails_start_up(catalog):
    srv = Server(["--catalog", str(catalog), "--database", "postgresql://nobody@127.0.0.1:1/x"])
    assert srv.process.wait(120) == 1
    srv.stop()
    assert "cannot open the database postgresql+psycopg://nobody@127.0.0.1:1/x" in srv.log()


def test_the_tokenizer_routes_keep_to_the_keys_models_and_count_against_its_rpm(
    catalog, db, tiny_models, tmp_path
):
    """A key limited to one model tokenizes with that model's tokenizer only, and each
    /tokenize, /detokenize and /tokenizer_info request counts against its rpm, as any request.
    Before: they were not counted at all (a key with `--rpm 3` tokenized without end), and one
    that named no model got the server's first model, one the key may not use: a 404 that
    named a model the key is not to hear of."""
    other = {"id": "test-org/other", "kind": "chat", "source": str(tiny_models["qwen2"]),
             "max_model_len": 256, "engine": {"dtype": "float32"}}  # fmt: skip
    entries = json.loads(catalog.read_text())["models"]
    two = tmp_path / "models.yaml"
    two.write_text(json.dumps({"models": [other, *entries]}))  # the other model first
    own = start_server(two, db)
    try:
        name, key = new_key(db, models=[MODEL], rpm=4)
        http = httpx.Client(base_url=own.url, headers={"Authorization": f"Bearer {key}"})
        refused = http.post("/tokenize", json={"model": other["id"], "prompt": "a b"})
        assert refused.status_code == 404
        assert refused.json()["error"]["code"] == "model_not_found"
        assert http.get("/tokenizer_info", params={"model": other["id"]}).status_code == 404
        tokenized = http.post("/tokenize", json={"prompt": "a b"})  # the key's model
        assert tokenized.status_code == 200, tokenized.text
        assert tokenized.json()["max_model_len"] == 512
        assert tokenized.headers["x-ratelimit-remaining-requests"] == "3"
        tokens = tokenized.json()["tokens"]
        detokenized = http.post("/detokenize", json={"tokens": tokens})
        assert detokenized.json()["prompt"] == "a b"
        assert detokenized.headers["x-ratelimit-remaining-requests"] == "2"
        assert http.get("/tokenizer_info").headers["x-ratelimit-remaining-requests"] == "1"
        assert http.post("/tokenize", json={"model": MODEL, "prompt": "c"}).status_code == 200
        limited = http.post("/tokenize", json={"prompt": "a b"})
        assert limited.status_code == 429, limited.text
        assert limited.json()["error"]["code"] == "rate_limit_exceeded"
        assert "retry-after" in limited.headers
        rows = wait_for(lambda: (rows := ledger(db, name)) and len(rows) == 4 and rows)
        assert [r["endpoint"] for r in rows] == [
            "/tokenize", "/detokenize", "/tokenizer_info", "/tokenize"
        ]  # fmt: skip
        assert {(r["model"], r["input_tokens"], r["cost_usd"]) for r in rows} == {(MODEL, 0, 0.0)}
    finally:
        assert own.stop() == 0, own.log()
