"""What keys cost a request: key lookup, limit check and ledger write (server/keys/) against
static --api-keys, on SQLite and on PostgreSQL, side by side in one run.

Part 1 (`overhead`): the real KeyAuth middleware and Gateway around an endpoint that does what
the chat endpoint does with its meter (allows, admit, record) and answers at once, driven
in-process through ASGI at a paced rate (default 500 requests/s), in interleaved rounds per
configuration. The ledger rounds run in their worker thread meanwhile, as in the server.
Reports p50/p90/p99 latency per configuration and the p50 added over static keys, and checks
that the ledger holds one row per request.

Part 2 (`chat`, optional): a real `pagoda serve` with one static key and one database key;
benchmarks/serve.py runs the same chat load with each key in alternating rounds and the
output-token throughputs are compared.

    python benchmarks/gateway.py --out benchmarks/results/gateway.json
    python benchmarks/gateway.py --chat --out ...   # adds part 2 (SmolLM2 from the catalog)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pagoda.server.keys import store  # noqa: E402
from pagoda.server.keys.database import open_database  # noqa: E402
from pagoda.server.keys.gateway import Gateway, KeyAuth  # noqa: E402
from pagoda.server.keys.meter import request_meter  # noqa: E402

STATIC = "sk-static-benchmark"
MODEL = "bench-model"


class Pricing:
    input_per_1m = 0.15
    output_per_1m = 0.6


def endpoint_app():
    """The chat endpoint's use of the meter, without a model."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def chat(request: Request):
        meter = request_meter(request)
        assert meter.allows(MODEL)
        meter.admit(MODEL, 32, 16)
        meter.record(input_tokens=32, output_tokens=16)
        return JSONResponse({"usage": {"prompt_tokens": 32, "completion_tokens": 16}})

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


def scope_for(key: str) -> dict:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"authorization", f"Bearer {key}".encode())],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }


async def one(app, key: str) -> tuple[float, int]:
    status = 0

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message):
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    start = time.perf_counter()
    await app(scope_for(key), receive, send)
    return time.perf_counter() - start, status


async def paced(app, key: str, rate: float, n: int) -> list[float]:
    """n requests at `rate` per second (open loop); their latencies in seconds."""
    start = time.perf_counter()
    tasks = []
    for i in range(n):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(app, key)))
    results = await asyncio.gather(*tasks)
    assert all(status == 200 for _, status in results), {s for _, s in results}
    return [latency for latency, _ in results]


async def overhead(urls: dict[str, str], rate: float, n: int, rounds: int) -> dict:
    setups = {"static": (Gateway([STATIC]), STATIC)}
    engines = {}
    for name, url in urls.items():
        engine = engines[name] = open_database(url)
        _, secret = store.create_key(
            engine, store.KeySpec(name="bench", rpm=store.INT32, tpm=store.INT32, budget=1e9)
        )
        setups[name] = (Gateway([], engine, prices={MODEL: Pricing()}), secret)
    apps = {name: KeyAuth(endpoint_app(), gateway=g) for name, (g, _) in setups.items()}
    for gateway, _ in setups.values():
        await gateway.start()
    latencies: dict[str, list[list[float]]] = {name: [] for name in setups}
    for name in setups:  # warm-up
        await paced(apps[name], setups[name][1], rate, 200)
    for _ in range(rounds):
        for name, (_, key) in setups.items():
            latencies[name].append(await paced(apps[name], key, rate, n))
    for gateway, _ in setups.values():
        await gateway.close()
    summary = {}
    for name, per_round in latencies.items():
        flat = sorted(x * 1e3 for r in per_round for x in r)
        summary[name] = {
            "requests": len(flat),
            "p50_ms_per_round": [round(statistics.median(r) * 1e3, 4) for r in per_round],
            "p50_ms": round(statistics.median(flat), 4),
            "p90_ms": round(flat[int(0.9 * len(flat))], 4),
            "p99_ms": round(flat[int(0.99 * len(flat))], 4),
        }
    for name, engine in engines.items():
        with engine.connect() as c:
            rows = c.execute(sa.select(sa.func.count()).select_from(store.usage)).scalar()
        summary[name]["ledger_rows"] = rows  # warm-up included
        summary[name]["added_p50_ms"] = round(
            summary[name]["p50_ms"] - summary["static"]["p50_ms"], 4
        )
        engine.dispose()
    return summary


def chat(database: str, rounds: int, serve_args: list[str]) -> dict:
    """benchmarks/serve.py with a static key and with a database key, alternating."""
    from tests.serving import Server

    engine = open_database(database)
    _, secret = store.create_key(
        engine, store.KeySpec(name="chat", rpm=store.INT32, tpm=store.INT32)
    )
    engine.dispose()
    server = Server(["--database", database, "--api-key", STATIC]).wait_ready(600)
    results: dict[str, list[float]] = {"static": [], "database": []}
    try:
        for i in range(rounds):
            order = [("static", STATIC), ("database", secret)]
            for name, key in order if i % 2 == 0 else order[::-1]:  # ABBA: drift cancels
                with tempfile.NamedTemporaryFile(suffix=".json") as out:
                    subprocess.run(
                        [sys.executable, str(Path(__file__).parent / "serve.py"),
                         "--base-url", f"{server.url}/v1", "--endpoint", "chat",
                         "--api-key", key, "--result-json", out.name, *serve_args],
                        check=True, capture_output=True,
                    )  # fmt: skip
                    metrics = json.loads(Path(out.name).read_text())["metrics"]
                results[name].append(metrics["output_token_throughput"])
    finally:
        server.stop()
    medians = {name: statistics.median(v) for name, v in results.items()}
    return {
        "serve_args": serve_args,
        "output_tok_per_s": results,
        "median": medians,
        "ratio_database_over_static": round(medians["database"] / medians["static"], 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=500.0, help="requests per second")
    parser.add_argument("--requests", type=int, default=2000, help="per round and configuration")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--chat", action="store_true", help="also part 2 (a real server)")
    parser.add_argument("--chat-rounds", type=int, default=3)
    parser.add_argument(
        "--chat-args",
        default="--num-prompts 32 --input-len 64 --output-len 32 --max-concurrency 8",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="pagoda-gateway-"))
    urls = {"sqlite": f"sqlite:///{work / 'keys.db'}"}
    postgres = None
    if not args.no_postgres:
        from tests.postgres import PostgresServer, binaries

        if binaries() is not None:
            postgres = PostgresServer(binaries())
            urls["postgresql"] = postgres.create_database("bench")
    try:
        result = {
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "rate": args.rate,
            "requests_per_round": args.requests,
            "rounds": args.rounds,
            "overhead": asyncio.run(overhead(urls, args.rate, args.requests, args.rounds)),
        }
        if args.chat:
            result["chat"] = chat(
                f"sqlite:///{work / 'chat.db'}", args.chat_rounds, args.chat_args.split()
            )
    finally:
        if postgres is not None:
            postgres.close()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
