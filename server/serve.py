"""`pagoda serve`: start the engines of the catalog (or of one --model), then serve HTTP."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable

import uvicorn
from sse_starlette.sse import AppStatus

from pagoda.engine import loader
from pagoda.engine.config import EngineConfig
from pagoda.engine.worker import freeze_heap
from pagoda.logs import at_revision, describe_error, route_library_logs
from pagoda.server import parallel
from pagoda.server.app import Served, build_app
from pagoda.server.catalog import (
    Capabilities,
    CatalogEntry,
    CatalogError,
    entry_error,
)
from pagoda.server.chat_models import ChatModel, chat_models
from pagoda.server.connections import uvicorn_limits
from pagoda.server.drain import FLUSH_S, DrainGate, DrainingServer
from pagoda.server.embedding_metrics import EmbeddingStatsCollector
from pagoda.server.embeddings import start_embedding_models
from pagoda.server.generation import ServedModel, set_stream_send_timeout
from pagoda.server.image_store import ImageStore
from pagoda.server.images import start_image_models
from pagoda.server.metrics import HTTPResponseCounter, Metrics
from pagoda.server.preflight import Preflight
from pagoda.server.process_metrics import register_process_metrics
from pagoda.server.reasoning import ReasoningParser, reasoning_parser
from pagoda.server.replicas import ReplicaStatsCollector
from pagoda.server.request_fields import set_strict_request_fields
from pagoda.server.request_ids import RequestIds
from pagoda.server.request_log import set_log_requests
from pagoda.server.response_store import ResponseStore
from pagoda.server.worker_client import set_max_failed_starts, start_side_by_side
from pagoda.server.worker_metrics import WorkerCollector

logger = logging.getLogger("pagoda")


def engine_config(model: ChatModel) -> EngineConfig:
    return EngineConfig(
        model=model.source,
        revision=model.revision,
        serving=True,
        lora_modules=model.lora_modules,
        **model.engine_kwargs,
    )


def image_entries(entries: list[CatalogEntry]) -> list[CatalogEntry]:
    return [e for e in entries if e.enabled and e.kind == "image"]


def _weights(model: ChatModel) -> loader.ModelSource:
    """The model's weights, found (a hub id's downloaded); an error names the catalog entry."""
    try:
        return loader.resolve_source(model.source, model.revision)
    except ValueError as exc:
        if model.entry is None:
            raise
        raise entry_error(model.entry, str(exc)) from None


def _reasoning_parser(model: ChatModel, tokenizer) -> ReasoningParser | None:
    name = model.capabilities.reasoning_parser if model.capabilities else None
    if name is None:
        return None
    try:
        return reasoning_parser(name, tokenizer)
    except ValueError as exc:
        if model.entry is None:
            raise
        raise entry_error(model.entry, str(exc), "capabilities.reasoning_parser") from None


async def _tokenizer(model: ChatModel, source: loader.ModelSource):
    """The server's copy of the model's tokenizer, with the model's chat template where one
    overrides its own (everything that renders or reports the template reads it there); a
    failure names the model, on one line."""
    try:
        tokenizer = await asyncio.to_thread(loader.load_tokenizer, source)
    except Exception as exc:  # a missing or damaged file: OSError, ValueError, a library's own
        raise RuntimeError(
            f"model {model.id!r} failed to load its tokenizer: {describe_error(exc)}"
        ) from None
    if model.chat_template is not None:
        tokenizer.chat_template = model.chat_template.text
        logger.info("%s: chat template overridden by %s", model.id, model.chat_template.origin)
    return tokenizer


async def start_models(models: list[ChatModel]) -> dict[str, ServedModel]:
    if not models:
        return {}
    sources = [_weights(m) for m in models]  # before a worker starts
    clients = [parallel.engine_client(engine_config(m), m.id, m.data_parallel_size) for m in models]
    tokenizers = [_tokenizer(m, source) for m, source in zip(models, sources)]
    try:
        started = await start_side_by_side([*(c.start() for c in clients), *tokenizers])
        tokenizers = started[len(clients) :]
        reasoning = [_reasoning_parser(m, t) for m, t in zip(models, tokenizers)]
    except BaseException:
        await asyncio.gather(*(c.shutdown() for c in clients), return_exceptions=True)
        raise
    served = {}
    for model, source, client, tokenizer, parser in zip(
        models, sources, clients, tokenizers, reasoning
    ):
        capabilities = model.capabilities or Capabilities()
        base = ServedModel(
            model.id,
            client,
            tokenizer,
            owned_by=model.owned_by,
            max_model_len=client.max_model_len,
            supports_tools=capabilities.tools,
            supports_json=capabilities.json_,
            tool_call_parser=capabilities.tool_call_parser,
            reasoning=parser,
            max_waiting_requests=model.max_waiting_requests,
        )
        base.adapters = [base.adapter(a.name, a.source) for a in model.adapters]
        served[model.id] = base
        info = client.info
        kv_tokens = info["num_kv_blocks"] * info["block_size"]
        logger.info(
            "serving %s%s on %s (%s): max_model_len %d, KV cache %d blocks = %d tokens, "
            "up to %d tokens per step",
            model.id,
            at_revision(source.commit),
            info["device"],
            info["dtype"],
            info["max_model_len"],
            info["num_kv_blocks"],
            kv_tokens,
            info["max_num_batched_tokens"],
        )
        for adapter in model.adapters:
            logger.info("serving %s: LoRA adapter %s on %s", adapter.name, adapter.folder, model.id)
    return served


async def start_all(args: argparse.Namespace, checked: Preflight) -> dict[str, Served]:
    """Every model's worker, started side by side; if one fails, the others are stopped."""
    starts = [
        start_models(checked.chat_models),
        start_embedding_models(checked.entries),
        start_image_models(image_entries(checked.entries), args.cpu_threads),
    ]
    tasks = [asyncio.ensure_future(start) for start in starts]
    failure: BaseException | None = None
    try:
        await asyncio.gather(*tasks, return_exceptions=True)
    except BaseException as exc:  # cancelled: a signal while starting (_stop_while_starting)
        failure = exc
    ended = [t for t in tasks if t.done() and not t.cancelled()]
    failure = failure or next((t.exception() for t in ended if t.exception()), None)
    served = {name: m for t in ended if not t.exception() for name, m in t.result().items()}
    if failure is not None:
        # every kind that had started stops too: its workers ignore SIGTERM (a drain's), and
        # the interpreter's exit would wait on them for good
        await asyncio.gather(*(m.client.shutdown() for m in served.values()))
        raise failure
    if not served:
        raise CatalogError(f"{args.catalog}: no enabled model to serve")
    return served


def of_kind(served: dict[str, Served], *kinds: str) -> Callable[[], dict[str, dict]]:
    """The latest worker stats of the models of these kinds, for the metrics collectors."""
    return lambda: {name: m.client.stats for name, m in served.items() if m.kind in kinds}


def _stop_while_starting(signum: int, _frame: object) -> None:
    # SystemExit unwinds the start-up: each worker client that was starting stops its process
    # (and the interpreter's exit ends what is left: the workers are daemonic)
    logger.info(
        "%s while starting: stopping the workers started so far", signal.Signals(signum).name
    )
    raise SystemExit(0)


async def serve(args: argparse.Namespace, checked: Preflight) -> None:
    # until the server listens, a signal stops the start-up, as uvicorn's drain does after
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _stop_while_starting)
    set_strict_request_fields(args.strict_request_fields)
    set_max_failed_starts(args.max_failed_starts)
    set_log_requests(args.log_requests)
    set_stream_send_timeout(args.stream_send_timeout)
    gateway, sock = checked.gateway, checked.sock
    # only a server with image models keeps an image folder; taken before the models load, so
    # that a folder another server holds fails the start at once
    store = None
    if image_entries(checked.entries):
        store = ImageStore(args.image_dir, args.image_url_ttl, args.image_cache_bytes)
    served = await start_all(args, checked)

    async def stop_engines() -> None:
        logger.info("stopping the engines")
        await asyncio.gather(*(m.client.shutdown() for m in served.values()))

    metrics = Metrics(of_kind(served, "chat"), of_kind(served, "image"))
    # requests to an adapter are counted under its id; its engine's gauges under its parent's
    chat = [model for model in served.values() if model.kind == "chat"]
    metrics.start_series(m.id for model in chat for m in (model, *model.adapters))
    # a reranker's worker is an embedding worker: its series are the embedding models'
    metrics.registry.register(EmbeddingStatsCollector(of_kind(served, "embedding", "rerank")))
    gateway.register_metrics(metrics.registry)
    register_process_metrics(metrics.registry)
    clients = {name: model.client for name, model in served.items()}  # each outlives restarts
    metrics.registry.register(WorkerCollector(clients))
    metrics.registry.register(ReplicaStatsCollector(parallel.replicas_of(served)))
    app = build_app(
        served,
        metrics,
        gateway=gateway,
        max_body_bytes=args.max_request_bytes,
        body_timeout_s=args.request_body_timeout,
        max_concurrent_requests=args.max_concurrent_requests,
        on_shutdown=stop_engines,
        image_store=store,
        public_url=args.public_url,
        response_store=ResponseStore(args.max_stored_responses),
    )
    gate = DrainGate(app)
    # outermost, so that auth rejections, errors and the drain's 503s are counted too
    counted = HTTPResponseCounter(gate, metrics.http_responses, app.routes)
    config = uvicorn.Config(
        RequestIds(counted),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        log_config=None,  # uvicorn's records go through setup_logging's handler
        timeout_graceful_shutdown=FLUSH_S,  # after the drain: for what it could not end
        **uvicorn_limits(args),
    )
    if not gateway.closed:
        logger.warning("no API key configured: anyone who can reach this port can use it")
    logger.info(
        "listening on http://%s:%d/v1 (models: %s)", args.host, args.port, ", ".join(served)
    )
    # uvicorn drains on SIGINT/SIGTERM, then raises the signal again for the handler that was
    # there before it: make that one a no-op, so that a drained server exits 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    # Drain: let in-flight streams finish (DrainingServer ends what is left after
    # --shutdown-timeout) instead of sse-starlette's default of cutting them at once.
    AppStatus.disable_automatic_graceful_drain()
    freeze_heap()
    await DrainingServer(config, gate, clients.values(), args.shutdown_timeout).serve([sock])


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop where it is installed (a dependency on Linux and macOS), as uvicorn
    picks by itself when it makes the loop: the frontend is one Python thread, and with 32
    single-input embedding clients on 2 cores it answered 3-6% more requests a second. None:
    asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(args: argparse.Namespace, checked: Preflight | None) -> None:
    """The `serve` command, its arguments parsed and checked (server/cli.py); `checked` is None
    on a node that runs only tensor-parallel ranks."""
    route_library_logs()
    try:
        if checked is None:
            sys.exit(parallel.serve_ranks(engine_config(chat_models(args, [])[0])))
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            runner.run(serve(args, checked))
    except (CatalogError, RuntimeError, ValueError) as exc:
        logger.error("%s", exc)
        sys.exit(1)
