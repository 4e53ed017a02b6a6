"""The `pagoda` command line: `serve`, `keys`, `usage` and `tokenizer export`.

Only `serve` needs the server's modules (torch, transformers, uvicorn: seconds of imports), so
they are imported when it runs (server/serve.py), not for parsing or the other commands. Before
it imports them, `serve` checks what it can without them (server/preflight.py), then imports
torch and transformers and forks the process its workers fork from (server/forkserver.py),
which imports theirs on another core while this one imports its own."""

from __future__ import annotations

import argparse
import sys

from pagoda import __version__
from pagoda.logs import LOG_FORMATS, LOG_LEVELS
from pagoda.server import defaults, forkserver, tokenizer_export
from pagoda.server.arg_types import (
    at_least,
    device,
    generation_overrides,
    lora_module,
    port,
    public_url,
    seconds,
    size,
)
from pagoda.server.catalog import DEFAULT_CATALOG, DTYPE_NAMES
from pagoda.server.image_store import DEFAULT_MAX_BYTES, DEFAULT_TTL_S
from pagoda.server.keys import commands as key_commands
from pagoda.server.overload import DEFAULT_MAX_WAITING_REQUESTS
from pagoda.server.preflight import preflight
from pagoda.server.tool_parsers import PARSERS


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pagoda", description="OpenAI-compatible LLM server")
    parser.add_argument("--version", action="version", version=f"pagoda {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the catalog, or one model")
    what = serve.add_mutually_exclusive_group()
    what.add_argument("--model", help="serve this one model (hub id, folder or .gguf)")
    what.add_argument("--catalog", default=str(DEFAULT_CATALOG), help="models.yaml to serve")
    serve.add_argument("--served-model-name", help="the id clients use for --model")
    serve.add_argument(
        "--revision",
        help="--model's branch, tag or commit hash on the hub (default: its default branch)",
    )
    serve.add_argument(
        "--chat-template",
        help="--model's chat template instead of its tokenizer's: a Jinja file, or the "
        "template itself (catalog entries set chat_template)",
    )
    serve.add_argument(
        "--lora-modules",
        nargs="+",
        type=lora_module,
        metavar="NAME=PATH",
        help="LoRA adapters served on --model, each under its own model id: NAME=PATH (a PEFT "
        'folder or a hub id), or \'{"name": ..., "path": ..., "base_model_name": ...}\' '
        "(catalog entries set lora_modules)",
    )
    serve.add_argument(
        "--max-loras",
        type=at_least(1),
        help="LoRA adapter slots per engine; those beyond the adapters given at start take "
        "adapters loaded at run time (POST /v1/load_lora_adapter); catalog: engine.max_loras",
    )
    serve.add_argument(
        "--max-lora-rank",
        type=at_least(1),
        help="the largest adapter rank the engine takes (default: its largest adapter's, at "
        "least 16 with --max-loras above the adapters given)",
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=port, default=8000)
    serve.add_argument(
        "--api-key",
        action="append",
        default=[],
        help="accepted bearer key (repeatable; also PAGODA_API_KEYS, comma-separated)",
    )
    key_commands.add_serve_options(serve)
    serve.add_argument("--max-model-len", type=at_least(1))
    serve.add_argument("--dtype", choices=DTYPE_NAMES)
    serve.add_argument("--device", type=device, help="auto, cpu, cuda or cuda:N")
    serve.add_argument(
        "--generation-config",
        help="where the sampling fields a request leaves unset take their defaults from: auto "
        "(the model's generation_config.json, the default), vllm (OpenAI's defaults) or a folder",
    )
    serve.add_argument(
        "--override-generation-config",
        type=generation_overrides,
        help="sampling defaults over the generation config, e.g. '{\"temperature\": 0.7}'",
    )
    serve.add_argument("--max-num-seqs", type=at_least(1))
    serve.add_argument(
        "--max-num-batched-tokens",
        type=at_least(1),
        help="tokens per engine step (default: 8192 on a GPU, 256 on a CPU)",
    )
    serve.add_argument("--kv-cache-memory", type=size, help="bytes, or e.g. 2GiB")
    serve.add_argument(
        "--cpu-threads",
        type=at_least(1),
        help="fixed CPU threads per chat engine and image worker "
        "(default: all cores, fewer while others use them)",
    )
    add_parallel_options(serve)
    serve.add_argument(
        "--enforce-eager",
        action="store_true",
        default=None,
        help="no decode graphs (CUDA graphs on a GPU, kernel-call replays on a CPU)",
    )
    serve.add_argument(
        "--tool-call-parser",
        choices=list(PARSERS),
        help="how --model's auto tool calls are read (default hermes; the catalog says it "
        "per entry)",
    )
    serve.add_argument(
        "--reasoning-parser",
        choices=["qwen3", "deepseek_r1"],
        help="split --model's thinking (<think>...</think>) into the message's reasoning "
        "(the catalog says it per entry)",
    )
    serve.add_argument("--max-request-bytes", type=at_least(1), default=defaults.MAX_BODY_BYTES)
    serve.add_argument(
        "--max-concurrent-requests",
        type=at_least(1),
        help="per model; requests beyond it get 429 (default: no limit)",
    )
    serve.add_argument(
        "--max-waiting-requests",
        type=at_least(1),
        help="per chat model: requests waiting for a batch slot beyond it get 429 at once; "
        "a request's n choices count n "
        f"(default: the catalog's max_waiting_requests, {DEFAULT_MAX_WAITING_REQUESTS})",
    )
    serve.add_argument(
        "--shutdown-timeout", type=seconds, default=30.0, help="seconds to drain on SIGTERM"
    )
    serve.add_argument(
        "--max-failed-starts",
        type=at_least(0),
        default=defaults.MAX_FAILED_STARTS,
        help="restarts in a row that fail before a dead model's worker is given up",
    )
    serve.add_argument(
        "--max-stored-responses",
        type=at_least(0),
        default=defaults.MAX_STORED_RESPONSES,
        help="/v1/responses kept in memory for previous_response_id and GET (the oldest go "
        "first; lost on restart; 0 keeps none)",
    )
    serve.add_argument("--image-dir", help="image files behind URLs (~/.cache/pagoda/images)")
    serve.add_argument(
        "--image-url-ttl", type=seconds, default=DEFAULT_TTL_S, help="seconds an image URL lives"
    )
    serve.add_argument(
        "--image-cache-bytes",
        type=size,
        default=DEFAULT_MAX_BYTES,
        help="bound on --image-dir (bytes, or e.g. 2GiB): the oldest images go first",
    )
    serve.add_argument(
        "--public-url",
        type=public_url,
        help="the server's URL as clients see it (behind a proxy), for image URLs",
    )
    serve.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS, default="info")
    serve.add_argument(
        "--log-format", choices=LOG_FORMATS, default="text", help="json: one object a line"
    )
    serve.add_argument(
        "--log-probe-requests",
        action="store_true",
        help="keep GET /health and /metrics in the access log (left out by default)",
    )
    serve.add_argument(
        "--log-requests",
        action="store_true",
        help="log each request body (prompts included; off by default: no prompt is logged)",
    )
    add_connection_options(serve)
    serve.add_argument(
        "--strict-request-fields",
        action="store_true",
        help="refuse request fields the server does not know with a 400 (default: warn once)",
    )
    tokenizer_export.add_parser(commands)
    key_commands.add_commands(commands)
    args = parser.parse_args(argv)
    if args.command == "serve" and not args.model:
        for option in (
            "served_model_name",
            "revision",
            "chat_template",
            "tool_call_parser",
            "reasoning_parser",
            "lora_modules",
        ):
            if getattr(args, option) is not None:
                flag = "--" + option.replace("_", "-")
                serve.error(f"{flag} names how --model is served: give --model")
    return args


def add_parallel_options(serve: argparse.ArgumentParser) -> None:
    serve.add_argument(
        "--tensor-parallel-size",
        type=at_least(1),
        help="ranks (GPUs, or CPU core groups) per model",
    )
    serve.add_argument("--nnodes", type=at_least(1), help="machines the ranks span (default 1)")
    serve.add_argument(
        "--node-rank", type=at_least(0), help="this machine's index; node 0 serves HTTP"
    )
    serve.add_argument("--master-addr", help="node 0's address, where the ranks meet")
    serve.add_argument("--master-port", type=port, help="a free port on node 0 for the ranks")
    serve.add_argument(
        "--data-parallel-size",
        type=at_least(1),
        default=1,
        help="engine replicas per model (each with its own ranks); requests go to the least busy",
    )
    serve.add_argument(
        "--distributed-timeout",
        dest="distributed_timeout_s",
        type=seconds,
        help="seconds for every rank to join (default 120); then the start fails",
    )


def add_connection_options(serve: argparse.ArgumentParser) -> None:
    serve.add_argument(
        "--http",
        choices=["httptools", "h11"],
        default="httptools",
        help="HTTP/1.1 parser: httptools (llhttp, in C) or h11 (pure Python, slower); both "
        "with the request head bounded at 64 KiB",
    )
    serve.add_argument(
        "--timeout-keep-alive",
        type=at_least(0),
        default=5,
        help="seconds an idle keep-alive connection stays open (behind a load balancer: "
        "more than its idle timeout)",
    )
    serve.add_argument(
        "--limit-concurrency",
        type=at_least(1),
        default=4096,
        help="connections and requests at once; beyond it 503 (with Retry-After)",
    )
    serve.add_argument(
        "--backlog", type=at_least(1), default=2048, help="connections waiting for accept"
    )
    serve.add_argument(
        "--request-body-timeout",
        type=seconds,
        default=defaults.BODY_TIMEOUT_S,
        help="seconds a request body may take to arrive; then 408",
    )
    serve.add_argument(
        "--stream-send-timeout",
        type=seconds,
        default=defaults.STREAM_SEND_TIMEOUT_S,
        help="seconds a stream waits for a client that stopped reading; then it is cut",
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.command == "tokenizer":
        sys.exit(tokenizer_export.run(args))
    if args.command != "serve":
        sys.exit(key_commands.run(args))
    checked = preflight(args)
    if checked is not None:  # a rank node starts no workers
        forkserver.start(checked.worker_kinds, release=checked.sock.close)
    from pagoda.server import serve  # see the module's docstring

    try:
        serve.run(args, checked)
    except SystemExit:
        forkserver.stop()
        raise
