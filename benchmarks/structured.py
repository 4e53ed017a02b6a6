"""The cost of structured outputs, side by side in one run against one server.

1. Throughput: `--concurrency` chat requests in flight at a time, `--num-requests` in all, each
   asking for an order as JSON, `max_tokens = --output-len`, temperature 0. Arm "json_schema"
   sends a realistic `response_format` schema (nested objects, arrays, enums, patterns);
   arm "unconstrained" sends the same requests without it (with `ignore_eos`, so that both arms
   generate about `--output-len` tokens per request). The arms alternate for `--rounds` rounds;
   the report gives output tok/s per round, the medians and their ratio.
2. Grammar compile time of that schema against the served tokenizer, cold (a schema not seen
   before) and cached (the engine's compiler, in this process), medians of `--repeats`.
3. TTFT of a request whose schema is new to the server (its grammar compiles first) against one
   whose schema was just used (cached), medians of `--repeats`, one request at a time.
4. The sampler's time per step for 32 rows of logits without and with a grammar per row
   (greedy and temperature 1), alternating, medians: the per-step cost of the masks, free of
   the serving noise of a shared machine.

    python benchmarks/structured.py                       # starts `pagoda serve` (SmolLM2)
    python benchmarks/structured.py --base-url http://127.0.0.1:8000/v1 --model NAME
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx

ORDER_SCHEMA = {
    "type": "object",
    "properties": {
        "order_id": {"type": "string", "pattern": "^ORD-[0-9]{6}$"},
        "status": {"enum": ["pending", "paid", "shipped", "delivered", "cancelled"]},
        "customer": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "email": {"type": "string", "format": "email"},
                "vip": {"type": "boolean"},
                "address": {
                    "type": "object",
                    "properties": {
                        "street": {"type": "string"},
                        "city": {"type": "string"},
                        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                        "country": {"type": "string", "enum": ["FR", "DE", "US", "GB", "JP"]},
                    },
                    "required": ["street", "city", "zip", "country"],
                },
            },
            "required": ["name", "email", "vip", "address"],
        },
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 20,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                    "name": {"type": "string"},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 100},
                    "unit_price": {"type": "number", "minimum": 0},
                    "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
                },
                "required": ["sku", "name", "quantity", "unit_price"],
            },
        },
        "notes": {"type": "string"},
    },
    "required": ["order_id", "status", "customer", "items"],
}
PROMPT = (
    "Write the order #{i} of a customer of an online shop as JSON: order_id, status, the "
    "customer with name, email, vip flag and address, and many items with sku, name, quantity, "
    "unit_price and tags."
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base-url", help="a running server's /v1 URL (default: start pagoda serve)")
    p.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--result-json", type=Path)
    return p.parse_args(argv)


def start_server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "pagoda", "serve", "--port", str(port)],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"pagoda serve exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, f"{url}/v1"
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise TimeoutError("pagoda serve did not come up")


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "order", "schema": schema}}


async def one_request(client: httpx.AsyncClient, body: dict) -> tuple[float, int, float]:
    """(seconds to the first content, completion tokens, seconds in all) of a streamed chat."""
    start = time.perf_counter()
    ttft, tokens = None, 0
    stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/chat/completions", json=stream_body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return ttft or float("nan"), tokens, time.perf_counter() - start


async def throughput(client: httpx.AsyncClient, args, constrained: bool) -> dict:
    slots = asyncio.Semaphore(args.concurrency)

    async def run(i: int) -> tuple[float, int, float]:
        body = {
            "model": args.model,
            "messages": [{"role": "user", "content": PROMPT.format(i=i)}],
            "max_tokens": args.output_len,
            "temperature": 0,
        }
        if constrained:
            body["response_format"] = schema_format(ORDER_SCHEMA)
        else:
            body["ignore_eos"] = True
        async with slots:
            return await one_request(client, body)

    start = time.perf_counter()
    results = await asyncio.gather(*(run(i) for i in range(args.num_requests)))
    duration = time.perf_counter() - start
    tokens = sum(r[1] for r in results)
    return {
        "output_tokens": tokens,
        "duration_s": duration,
        "output_tok_s": tokens / duration,
        "mean_output_len": tokens / len(results),
        "median_ttft_ms": 1000 * statistics.median(r[0] for r in results),
    }


async def ttft_cold_vs_cached(client: httpx.AsyncClient, args) -> dict:
    cold, cached = [], []
    for _ in range(args.repeats):
        schema = {**ORDER_SCHEMA, "title": f"order-{uuid.uuid4().hex}"}  # new to the server
        body = {
            "model": args.model,
            "messages": [{"role": "user", "content": PROMPT.format(i=0)}],
            "max_tokens": 4,
            "temperature": 0,
            "response_format": schema_format(schema),
        }
        cold.append((await one_request(client, body))[0])
        cached.append((await one_request(client, body))[0])
    return {
        "ttft_cold_ms": 1000 * statistics.median(cold),
        "ttft_cached_ms": 1000 * statistics.median(cached),
        "raw_cold_ms": [1000 * t for t in cold],
        "raw_cached_ms": [1000 * t for t in cached],
    }


def in_process(args) -> dict:
    """Grammar compile times and the sampler's cost per step, with the engine's own code on the
    served model's tokenizer, in this process."""
    from pagoda.engine import loader
    from pagoda.engine.structured_output import GrammarCompiler
    from pagoda.server.catalog import DEFAULT_CATALOG, load_catalog, resolve_source

    entry = next(e for e in load_catalog(DEFAULT_CATALOG) if e.id == args.model)
    source = loader.resolve_source(resolve_source(entry))
    tokenizer = loader.load_tokenizer(source)
    config = loader.load_config(source)
    eos = loader.eos_token_ids(source, config, tokenizer)
    compiler = GrammarCompiler(tokenizer, config.vocab_size, eos)
    result = {**compile_times(compiler, args), **sampler_cost(compiler, tokenizer, config, eos)}
    compiler.shutdown()
    return result


def sampler_cost(compiler, tokenizer, config, eos, rows: int = 32, repeats: int = 30) -> dict:
    """`sample()` on `rows` rows of logits, without and with a grammar per row (matchers in the
    middle of the order schema, inside a string), alternating; medians in ms."""
    import torch

    from pagoda.engine.sampler import sample
    from pagoda.engine.sampling_params import SamplingParams, StructuredOutputsParams
    from pagoda.engine.sequence import Sequence
    from pagoda.engine.structured_output import attach, start_matcher

    constraint = StructuredOutputsParams(json=ORDER_SCHEMA)
    compiled = compiler.submit(constraint)
    prefix = tokenizer.encode('{"order_id": "ORD-123456", "status": "paid", "customer": {"name"')

    def batch(constrained: bool, temperature: float) -> list[Sequence]:
        seqs = []
        for i in range(rows):
            params = SamplingParams(
                temperature=temperature,
                max_tokens=1000,
                structured_outputs=constraint if constrained else None,
            )
            seq = Sequence(str(i), 0, [1, *prefix], 1, params, 1000, eos)
            if constrained:
                attach(seq, compiled)
                start_matcher(seq)
            seqs.append(seq)
        return seqs

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, config.vocab_size, generator=generator) * 3
    result = {}
    for temperature in (0.0, 1.0):
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(repeats):
            for constrained in (False, True):
                seqs, work = batch(constrained, temperature), logits.clone()
                start = time.perf_counter()
                sample(work, seqs, generator)
                times[constrained].append(time.perf_counter() - start)
        for constrained, label in ((False, "unconstrained"), (True, "json_schema")):
            key = f"sample_ms_t{temperature:g}_{label}"
            result[key] = 1000 * statistics.median(times[constrained])
    return result


def compile_times(compiler, args) -> dict:
    from pagoda.engine.sampling_params import StructuredOutputsParams

    cold, cached = [], []
    for _ in range(args.repeats):
        params = StructuredOutputsParams(json={**ORDER_SCHEMA, "title": uuid.uuid4().hex})
        start = time.perf_counter()
        compiler.submit(params).result()
        cold.append(time.perf_counter() - start)
        start = time.perf_counter()
        compiler.submit(params).result()
        cached.append(time.perf_counter() - start)
    return {
        "compile_cold_ms": 1000 * statistics.median(cold),
        "compile_cached_ms": 1000 * statistics.median(cached),
    }


async def benchmark(args, base_url: str) -> dict:
    async with httpx.AsyncClient(base_url=base_url, timeout=None) as client:
        await one_request(
            client,
            {"model": args.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        )
        rounds = []
        for r in range(args.rounds):
            for arm, constrained in (("unconstrained", False), ("json_schema", True)):
                result = await throughput(client, args, constrained)
                rounds.append({"round": r, "arm": arm, **result})
                print(
                    f"round {r} {arm:13s} {result['output_tok_s']:7.1f} output tok/s "
                    f"(mean output {result['mean_output_len']:.0f} tokens)",
                    flush=True,
                )
        ttft = await ttft_cold_vs_cached(client, args)
    medians = {
        arm: statistics.median(x["output_tok_s"] for x in rounds if x["arm"] == arm)
        for arm in ("unconstrained", "json_schema")
    }
    return {
        "rounds": rounds,
        "median_output_tok_s": medians,
        "ratio_json_schema_to_unconstrained": medians["json_schema"] / medians["unconstrained"],
        **ttft,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    process = None
    base_url = args.base_url
    if base_url is None:
        process, base_url = start_server()
    try:
        result = asyncio.run(benchmark(args, base_url))
    finally:
        if process is not None:
            process.terminate()
            process.wait(60)
    result.update(in_process(args))
    result["config"] = {**vars(args), "result_json": str(args.result_json), "base_url": base_url}
    result["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform()}
    print(
        f"output tok/s, medians: unconstrained {result['median_output_tok_s']['unconstrained']:.1f}"
        f", json_schema {result['median_output_tok_s']['json_schema']:.1f} "
        f"(ratio {result['ratio_json_schema_to_unconstrained']:.3f})\n"
        f"grammar compile: cold {result['compile_cold_ms']:.1f} ms, "
        f"cached {result['compile_cached_ms']:.3f} ms\n"
        f"TTFT: new schema {result['ttft_cold_ms']:.0f} ms, "
        f"cached {result['ttft_cached_ms']:.0f} ms"
    )
    for temperature in ("0", "1"):
        plain = result[f"sample_ms_t{temperature}_unconstrained"]
        constrained = result[f"sample_ms_t{temperature}_json_schema"]
        print(
            f"sample() of 32 rows at temperature {temperature}: {plain:.2f} ms unconstrained, "
            f"{constrained:.2f} ms with 32 grammars"
        )
    if args.result_json:
        args.result_json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
