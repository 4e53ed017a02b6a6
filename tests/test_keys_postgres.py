"""Keys and the ledger on a real PostgreSQL server that the tests start (tests/postgres.py),
and a server that keeps its promises while that database goes away and comes back."""

from __future__ import annotations

from datetime import timedelta

import httpx
import openai
import pytest

from pagoda.server.keys import store
from pagoda.server.keys.database import open_database, schema_version
from tests.serving import Server
from tests.test_keys import (
    MODEL,
    STATIC,
    chat,
    create_keys_at_once,
    ledger,
    new_key,
    sdk,
    wait_for,
)


@pytest.fixture(scope="module")
def pg_url(postgres) -> str:
    return postgres.create_database("pagoda_keys")


def test_schema_and_operations_on_postgres(postgres):
    url = postgres.create_database("pagoda_store")
    engine = open_database(url)
    assert schema_version(engine) == ("0002", "0002")
    row, secret = store.create_key(engine, store.KeySpec(name="a", models=["m"], budget=1.0))
    assert row["models"] == ["m"] and "key_hash" not in row
    assert store.get_key(engine, "a")["key_hash"] == store.key_hash(secret)
    with pytest.raises(store.StoreError):
        store.create_key(engine, store.KeySpec(name="a"))
    key_id = store.get_key(engine, "a")["id"]
    store.write_usage(engine, [_row(key_id, 0.25), _row(key_id, 0.5)])
    (report,) = store.usage_report(engine, key="a")
    assert report["requests"] == 2 and report["cost_usd"] == pytest.approx(0.75)
    assert store.get_key(engine, "a")["spent_usd"] == pytest.approx(0.75)
    assert store.usage_report(engine, since=store.parse_when("2999-01-01")) == []
    change = store.KeyUpdate(models=None, rpm=7, budget=None)  # models: null, not JSON null
    row = store.update_key(engine, "a", change)
    assert (row["models"], row["rpm"], row["budget_usd"]) == (None, 7, None)
    assert row["spent_usd"] == pytest.approx(0.75)
    assert store.get_key(engine, "a")["key_hash"] == store.key_hash(secret)
    # a budget period that ended: reset once (timestamptz read back and matched exactly)
    row = store.update_key(engine, "a", store.KeyUpdate(budget=1.0, budget_period="1d"))
    now = store.now()
    with engine.begin() as c:
        ended = store.api_keys.update().where(store.api_keys.c.name == "a")
        c.execute(ended.values(budget_reset_at=now - timedelta(hours=30)))
    assert store.reset_budgets(engine, now) == 1
    assert store.reset_budgets(engine, now) == 0
    row = store.get_key(engine, "a")
    assert row["spent_usd"] == 0 and row["budget_reset_at"] == now + timedelta(hours=18)
    store.revoke_key(engine, "a")
    with pytest.raises(store.StoreError, match="revoked"):
        store.update_key(engine, "a", change)
    with pytest.raises(store.UnknownKey):
        store.revoke_key(engine, "b")
    engine.dispose()
    open_database(url).dispose()  # migrated already: nothing to do


def test_processes_starting_on_a_new_database_at_once_all_migrate_it(postgres):
    """Before: each created the tables in its own transaction, and those that lost the race
    failed on PostgreSQL's unique index of type names (`alembic_version already exists`)."""
    for attempt in range(2):
        url = postgres.create_database(f"pagoda_at_once_{attempt}")
        for done in create_keys_at_once(url):
            assert done.returncode == 0, done.stderr
        engine = open_database(url)
        assert len(store.list_keys(engine)) == 4
        engine.dispose()


def _row(key_id: int, cost: float) -> dict:
    return {
        "key_id": key_id,
        "model": "m",
        "endpoint": "/v1/chat/completions",
        "input_tokens": 3,
        "output_tokens": 4,
        "images": 0,
        "cost_usd": cost,
        "http_status": 200,
        "outcome": "completed",
        "latency_ms": 1.0,
        "created_at": store.now(),
    }


def test_a_server_on_postgres_limits_meters_fails_closed_and_recovers(
    tiny_models, postgres, pg_url
):
    server = Server(
        [
            "--model",
            str(tiny_models["llama"]),
            "--served-model-name",
            MODEL,
            "--dtype",
            "float32",
            "--max-model-len",
            "512",
            "--database",
            pg_url,
            "--api-key",
            STATIC,
        ]  # fmt: skip
    ).wait_ready()
    try:
        _, limited = new_key(pg_url, rpm=10)
        for _ in range(10):
            chat(sdk(server, limited), max_tokens=1)
        with pytest.raises(openai.RateLimitError):
            chat(sdk(server, limited), max_tokens=1)

        name, key = new_key(pg_url)
        before = [chat(sdk(server, key)).usage for _ in range(2)]
        postgres.stop()  # the last request's row may not be written yet
        auth = {"Authorization": f"Bearer {key}"}
        down = wait_for(
            lambda: (
                (r := httpx.get(f"{server.url}/v1/models", headers=auth))
                and r.status_code == 503
                and r
            )
        )
        assert down.json()["error"]["type"] == "service_unavailable"
        assert chat(sdk(server, STATIC)).usage.completion_tokens == 2  # static keys need no db
        with pytest.raises(openai.InternalServerError):
            chat(sdk(server, key))
        postgres.start()
        wait_for(lambda: httpx.get(f"{server.url}/v1/models", headers=auth).status_code == 200)
        after = chat(sdk(server, key)).usage
        rows = wait_for(lambda: (rows := ledger(pg_url, name)) and len(rows) == 3 and rows)
        for row, usage in zip(rows, [*before, after]):
            assert (row["input_tokens"], row["output_tokens"]) == (
                usage.prompt_tokens,
                usage.completion_tokens,
            )
        log = server.log()
        assert log.count("the key database is unreachable") == 1, log  # logged once
        assert "the key database is back" in log
    finally:
        assert server.stop() == 0
    assert key not in server.log() and limited not in server.log()
