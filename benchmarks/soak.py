"""Soak: drive a real `pagoda serve` with many chat requests (30% of them streams the client
drops at a random point, the rest streamed, plain, n=2 and logprob requests, all greedy), then
check that it is back where it started: no sequence running or waiting, no KV block in use,
no more open fds, threads or asyncio tasks than after the warm-up, resident memory within 5%
of it, and every request that was not dropped answered with the reference answer (the same
prompt asked alone, greedy, before the soak).

    python -m benchmarks.soak                        # 1,000 requests to a tiny llama built here
    python -m benchmarks.soak --requests 5000 --concurrency 64 --result-json /tmp/soak.json
    python -m benchmarks.soak --model /path/to/model --serve-arg=--dtype=float32

Run from the repository root (the tiny model comes from tests/tiny_models.py). It prints one
JSON report and exits 1 when a check fails. tests/test_soak.py runs the same at a small size.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

PROMPTS = [
    "Tell me about the sea.",
    "Count to ten.",
    "What is a paged KV cache?",
    "Write a haiku about servers.",
    "Why is the sky blue?",
    "List three colours.",
    "hello",
    "Explain continuous batching in one sentence.",
]
MAX_TOKENS = (8, 16, 32)
# what each request is, and how often
MIX = {"dropped": 0.30, "stream": 0.25, "plain": 0.15, "n2": 0.15, "logprobs": 0.15}
RSS_TOLERANCE = 0.05


@dataclass(slots=True)
class Resources:
    """The server process's, from /metrics (server/process_metrics.py)."""

    open_fds: float
    rss_bytes: float
    threads: float
    asyncio_tasks: float


@dataclass
class Report:
    requests: int
    seconds: float = 0.0
    kinds: dict = field(default_factory=dict)
    wrong: list = field(default_factory=list)  # (kind, prompt, max_tokens, what came)
    warm: Resources | None = None
    after: Resources | None = None
    engine: dict = field(default_factory=dict)  # running, waiting, KV usage, prefix blocks

    def failures(self) -> list[str]:
        warm, after, engine = self.warm, self.after, self.engine
        checks = {
            "wrong or failed answers": not self.wrong,
            "sequences still running or waiting": engine["running"] + engine["waiting"] == 0,
            "KV blocks still in use": engine["kv_cache_usage"] == 0,
            "open fds grew": after.open_fds <= warm.open_fds,
            "threads grew": after.threads <= warm.threads,
            "asyncio tasks grew": after.asyncio_tasks <= warm.asyncio_tasks,
            "resident memory moved by more than 5%": abs(after.rss_bytes - warm.rss_bytes)
            <= RSS_TOLERANCE * warm.rss_bytes,
        }
        return [what for what, ok in checks.items() if not ok]


def scrape(url: str, model: str) -> tuple[Resources, dict]:
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.labels.get("model_name", model) == model:
                values[sample.name] = sample.value
    resources = Resources(
        values["process_open_fds"],
        values["process_resident_memory_bytes"],
        values["pagoda:server_threads"],
        values["pagoda:server_asyncio_tasks"],
    )
    engine = {
        "running": values["pagoda:num_requests_running"],
        "waiting": values["pagoda:num_requests_waiting"],
        "kv_cache_usage": values["pagoda:kv_cache_usage_perc"],
        "prefix_cache_blocks": values["pagoda:prefix_cache_blocks"],
    }
    return resources, engine


def settle(url: str, model: str, timeout: float = 30.0) -> tuple[Resources, dict]:
    """The figures once the engine is idle (its stats come every second) and the closed
    connections are gone."""
    deadline = time.monotonic() + timeout
    while True:
        time.sleep(1.5)
        resources, engine = scrape(url, model)
        idle = engine["running"] + engine["waiting"] == 0 and engine["kv_cache_usage"] == 0
        if idle or time.monotonic() > deadline:
            return resources, engine


def _body(model: str, prompt: str, max_tokens: int, **extra) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,  # every answer has its full length: the reference is one string
        **extra,
    }


async def _post(client: httpx.AsyncClient, body: dict) -> dict:
    r = await client.post("/v1/chat/completions", json=body)
    r.raise_for_status()
    return r.json()


async def _stream(client: httpx.AsyncClient, body: dict, drop_after: int | None) -> str | None:
    """The streamed text, or None once the client dropped the stream after some events."""
    text, events = [], 0
    async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if drop_after is not None and events >= drop_after:
                return None  # leaving the block closes the connection mid-stream
            events += 1
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                return f"error event: {chunk['error']['message']}"
            text.extend(c["delta"].get("content") or "" for c in chunk["choices"])
    return "".join(text)


async def _one(client: httpx.AsyncClient, model: str, kind: str, prompt: str, n: int, rng):
    """What the request got, to compare with the reference (None: dropped on purpose)."""
    body = _body(model, prompt, n)
    if kind == "dropped":
        return await _stream(client, body, drop_after=rng.randint(0, n))
    if kind == "stream":
        return await _stream(client, body, drop_after=None)
    if kind == "plain":
        return (await _post(client, body))["choices"][0]["message"]["content"]
    if kind == "n2":
        choices = (await _post(client, {**body, "n": 2}))["choices"]
        texts = {c["message"]["content"] for c in choices}
        return texts.pop() if len(choices) == 2 and len(texts) == 1 else f"n=2 gave {texts}"
    answer = await _post(client, {**body, "logprobs": True, "top_logprobs": 2})
    choice = answer["choices"][0]
    content = choice["logprobs"]["content"]
    greedy = all(t["logprob"] == t["top_logprobs"][0]["logprob"] for t in content)
    if len(content) != answer["usage"]["completion_tokens"] or not greedy:
        return f"logprobs do not match the tokens: {content[:2]}"
    return choice["message"]["content"]


async def _references(url: str, model: str) -> dict[tuple[str, int], str]:
    """Each prompt asked alone, greedy: what every soak request must get."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        return {
            (p, n): (await _post(client, _body(model, p, n)))["choices"][0]["message"]["content"]
            for p in PROMPTS
            for n in MAX_TOKENS
        }


async def _drive(url, model, requests, concurrency, seed, references, report) -> None:
    rng = random.Random(seed)
    gate = asyncio.Semaphore(concurrency)
    kinds = Counter()

    async def one(client: httpx.AsyncClient) -> None:
        kind = rng.choices(list(MIX), weights=list(MIX.values()))[0]
        prompt, n = rng.choice(PROMPTS), rng.choice(MAX_TOKENS)
        kinds[kind] += 1
        async with gate:
            try:
                got = await _one(client, model, kind, prompt, n, rng)
            except httpx.HTTPError as exc:
                got = f"{type(exc).__name__}: {exc}"
        if got is not None and got != references[(prompt, n)]:
            report.wrong.append((kind, prompt, n, got))

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        await asyncio.gather(*(one(client) for _ in range(requests)))
    for kind, count in kinds.items():
        report.kinds[kind] = report.kinds.get(kind, 0) + count


def soak(url: str, model: str, requests: int, concurrency: int = 16, seed: int = 0) -> Report:
    """Warm up with a fifth of the requests (at least 50), take the figures, soak, compare."""
    report = Report(requests)
    references = asyncio.run(_references(url, model))
    warmup = max(50, requests // 5)
    asyncio.run(_drive(url, model, warmup, concurrency, seed + 1, references, report))
    report.warm, _ = settle(url, model)
    start = time.monotonic()
    asyncio.run(_drive(url, model, requests, concurrency, seed, references, report))
    report.seconds = time.monotonic() - start
    report.after, report.engine = settle(url, model)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", help="model folder (default: a tiny random llama)")
    parser.add_argument("--serve-arg", action="append", default=[], help="more serve flags")
    parser.add_argument("--result-json", type=Path)
    args = parser.parse_args()

    from tests.serving import Server  # run as `python -m benchmarks.soak` from the repo root
    from tests.tiny_models import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(build_tiny_model("llama", Path(tmp) / "llama"))
        serve_args = ["--model", model, *(args.serve_arg or ["--dtype", "float32"])]
        server = Server(serve_args).wait_ready()
        try:
            report = soak(server.url, model, args.requests, args.concurrency, args.seed)
        finally:
            exit_code = server.stop()
    result = {**asdict(report), "wrong": report.wrong[:20], "failures": report.failures()}
    result["server_exit_code"] = exit_code
    text = json.dumps(result, indent=2)
    print(text)
    if args.result_json:
        args.result_json.write_text(text)
    sys.exit(1 if result["failures"] or exit_code else 0)


if __name__ == "__main__":
    main()
