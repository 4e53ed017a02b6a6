"""The server's side of keys: who may call (bearer keys, static or from the database), within
which limits, and what each request costs (the ledger).

The request path never waits on the database: keys and their spend are held in memory and
re-read every `refresh_s`, in the same worker-thread round that writes the ledger rows
gathered since the last one (one transaction). A database that stops answering closes the
server to database keys (503) until a round succeeds again; the unwritten rows are kept and
written then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pagoda.server.disconnect import CLIENT_CLOSED
from pagoda.server.errors import APIError
from pagoda.server.image_store import URL_PATH
from pagoda.server.keys import store
from pagoda.server.keys.database import reason
from pagoda.server.keys.limits import KeyState
from pagoda.server.keys.meter import SCOPE_KEY, Meter

logger = logging.getLogger(__name__)
# vLLM's rerank and score paths outside /v1 too (server/rerank.py)
PROTECTED = ("/v1", "/tokenize", "/detokenize", "/tokenizer_info", "/rerank", "/v2/", "/score")
# image URLs are unguessable and expire: open to whoever holds one, as OpenAI's signed URLs are
PUBLIC = (URL_PATH,)
REFRESH_S = 0.5
MISS_ROUND_S = 0.1


class Gateway:
    def __init__(
        self,
        static_keys: list[str] = (),
        engine: sa.Engine | None = None,
        *,
        prices: Mapping[str, object] | None = None,
        admin_key: str | None = None,
        refresh_s: float = REFRESH_S,
    ) -> None:
        self.static = {store.key_hash(k) for k in static_keys}
        self.engine = engine
        self.prices = dict(prices or {})
        self.admin_key = admin_key
        self.refresh_s = refresh_s
        self.available = True
        self.ledger_failing = False  # rows could not be written in the last rounds
        self.by_hash: dict[str, KeyState] = {}
        self.by_id: dict[int, KeyState] = {}
        self.rows: list[dict] = []  # ledger rows not yet written
        self.metrics: _KeyMetrics | None = None
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._waiters: list[asyncio.Future] = []  # requests waiting for the next round
        if engine is not None:
            self._apply(store.load_keys(engine))

    def register_metrics(self, registry: CollectorRegistry) -> None:
        """Per-key request and token counters (key names, never secrets) on /metrics."""
        self.metrics = _KeyMetrics(registry)

    @property
    def closed(self) -> bool:
        """Whether callers need a key: some static key, or any key in the database."""
        return bool(self.static or self.by_id)

    # -- the request path (no database) ------------------------------------------------------

    async def authenticate(self, header: bytes) -> KeyState | None:
        """The key's state, None for a static key, or the 401/503 to answer."""
        scheme, _, token = header.partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            raise _unauthorized(
                "You didn't provide an API key. Pass it as 'Authorization: Bearer <key>'."
            )
        # looked up by its hash: how long the lookup takes says nothing about the key
        digest = store.key_hash(token)
        if digest in self.static:
            return None
        key = self.by_hash.get(digest) or await self._look_again(digest)
        if self.engine is not None and not self.available:
            raise APIError(503, "The key database is unavailable: retry shortly.")
        if key is None or key.revoked:
            raise _unauthorized("Incorrect API key provided.")
        if key.expires_at is not None and time.time() >= key.expires_at:
            raise _unauthorized(f"The API key '{key.name}' has expired.")
        return key

    async def _look_again(self, digest: str) -> KeyState | None:
        """An unknown key may be one created since the last round: wait for a round that
        starts after now (rounds come at most every MISS_ROUND_S, so unknown keys cannot make
        the server hammer its database)."""
        if self._task is None:
            return None
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._wake.set()
        await waiter
        return self.by_hash.get(digest)

    def finish(self, meter: Meter, status: int, completed: bool) -> None:
        """Bill an admitted request once its response has ended (or was cut); one refused
        after admission (a 4xx) is not billed and gets no ledger row. A server error (5xx)
        gets a row but reports no usage, so it bills nothing: its client got nothing."""
        key = meter.key
        if key is None or not meter.admitted:
            return
        meter.release()
        key.held_usd -= meter.held_usd  # what it cost replaces the most it could have
        if refused(status):
            meter.refuse()
            return
        input_tokens, output_tokens, images = meter.totals() if status < 500 else (0, 0, 0)
        key.tokens.correct(meter.take, input_tokens + output_tokens)
        cost = self.cost(meter.model, input_tokens, output_tokens, images)
        key.pending_usd += cost
        if status == CLIENT_CLOSED or (status < 400 and not completed):
            outcome = "aborted"  # the client left: before its answer (499) or during it
        else:
            outcome = "error" if status >= 400 else "completed"
        self.rows.append(
            {
                "key_id": key.id,
                "model": meter.model,
                "endpoint": meter.endpoint,
                "input_tokens": input_tokens,
                "output_tokens": output_tokens,
                "images": images,
                "cost_usd": cost,
                "http_status": status,
                "outcome": outcome,
                "latency_ms": (time.monotonic() - meter.started) * 1000,
                "created_at": store.now(),
            }
        )
        if self.metrics is not None:
            self.metrics.count(key.name, meter.model, input_tokens, output_tokens)

    def cost(self, model: str, input_tokens: int, output_tokens: int, images: int) -> float:
        price = self.prices.get(model)
        if price is None:
            return 0.0
        return (
            input_tokens * price.input_per_1m / 1e6
            + output_tokens * price.output_per_1m / 1e6
            + images * getattr(price, "per_image", 0.0)
        )

    # -- the database round ------------------------------------------------------------------

    async def start(self) -> None:
        if self.engine is not None:
            self._task = asyncio.create_task(self._run())

    async def close(self, attempts: int = 3) -> None:
        """Stop the rounds and write what is left (the server has drained by now)."""
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        for _ in range(attempts):
            if await self.sync():
                break
            await asyncio.sleep(1.0)
        else:
            logger.error("%d usage rows could not be written: the database is down", len(self.rows))
        for waiter in self._waiters:  # requests still waiting for a round: none will come
            if not waiter.done():
                waiter.set_result(None)
        self.engine.dispose()

    async def sync(self) -> bool:
        """Write the pending ledger rows, then re-read the keys; False if either failed. Only
        a failed read closes the server to database keys: rows that could not be written (a
        SQLite file another writer holds locked past the busy timeout) wait for the next
        round while the keys are still checked."""
        async with self._lock:
            rows, self.rows = self.rows, []
            try:
                loaded, unwritten = await asyncio.to_thread(self._round, rows)
            except Exception as exc:
                self.rows[:0] = rows
                if self.available:
                    self.available = False
                    logger.error(
                        "the key database is unreachable; database keys get 503 until it "
                        "is back (%s)",
                        reason(exc),
                    )
                return False
            if unwritten is not None:
                self.rows[:0] = rows
                if not self.ledger_failing:
                    self.ledger_failing = True
                    logger.warning(
                        "usage rows cannot be written (%s); kept and written once the "
                        "database takes them",
                        reason(unwritten),
                    )
                rows = []
            elif rows and self.ledger_failing:
                self.ledger_failing = False
                logger.info("the usage rows are written again (%d)", len(rows))
            for row in rows:
                if row["key_id"] in self.by_id:
                    self.by_id[row["key_id"]].pending_usd -= row["cost_usd"]
            self._apply(loaded)
            if not self.available:
                self.available = True
                logger.info("the key database is back; %d usage rows written", len(rows))
            return unwritten is None

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.refresh_s)
            await asyncio.sleep(max(0.0, started + MISS_ROUND_S - time.monotonic()))
            self._wake.clear()
            waiters, self._waiters = self._waiters, []
            try:
                await self.sync()
            finally:
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(None)

    def _round(self, rows: list[dict]) -> tuple[list[dict], Exception | None]:
        """The keys, and why `rows` were not written (None: they were)."""
        unwritten = None
        if rows:
            try:
                store.write_usage(self.engine, rows)  # one transaction: all or nothing
            except sa.exc.SQLAlchemyError as exc:
                unwritten = exc
        store.reset_budgets(self.engine, store.now())  # keys whose budget period ended
        return store.load_keys(self.engine), unwritten

    def _apply(self, rows: list[dict]) -> None:
        by_id = {}
        for row in rows:
            state = self.by_id.get(row["id"])
            if state is None:
                state = KeyState.from_row(row)
            else:
                state.update(row)
            by_id[row["id"]] = state
        self.by_id = by_id
        self.by_hash = {row["key_hash"]: by_id[row["id"]] for row in rows}


class KeyAuth:
    """ASGI middleware: authenticates /v1/* and the tokenizer routes, hands the endpoints a
    Meter, stamps the x-ratelimit-* headers on the response and bills the request when the
    response ends. /health, /metrics and /admin/* are not its concern."""

    def __init__(self, app: ASGIApp, gateway: Gateway) -> None:
        self.app = app
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")  # a lifespan scope has none
        if scope["type"] != "http" or not path.startswith(PROTECTED) or path.startswith(PUBLIC):
            await self.app(scope, receive, send)
            return
        key = None
        if self.gateway.closed:
            try:
                header = dict(scope["headers"]).get(b"authorization", b"")
                key = await self.gateway.authenticate(header)
            except APIError as error:
                await error.response()(scope, receive, send)
                return
        meter = scope[SCOPE_KEY] = Meter(key, scope["path"], self.gateway.cost)
        if key is None:
            await self.app(scope, receive, send)
            return
        response = {"status": 500, "completed": False}

        async def send_with_limits(message: Message) -> None:
            if message["type"] == "http.response.start":
                response["status"] = message["status"]
                if refused(message["status"]):  # before the headers say what is left
                    meter.refuse()
                limits = key.headers(time.monotonic())
                message["headers"] = [
                    *message.get("headers", []),
                    *((k.encode(), v.encode()) for k, v in limits.items()),
                ]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                response["completed"] = True
                if not meter.detached:
                    meter.release()
            await send(message)

        try:
            await self.app(scope, receive, send_with_limits)
        finally:
            self.gateway.finish(meter, response["status"], response["completed"])
            if self.gateway.metrics is not None:
                self.gateway.metrics.requests.labels(
                    key.name, meter.model or "", str(response["status"])
                ).inc()


class _KeyMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["key_name", "model_name"]
        self.requests = Counter(
            "pagoda:key_requests",
            "Requests by key, model and HTTP status",
            [*labels, "status"],
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "pagoda:key_prompt_tokens", "Input tokens billed by key", labels, registry=registry
        )
        self.generation_tokens = Counter(
            "pagoda:key_generation_tokens", "Output tokens billed by key", labels, registry=registry
        )

    def count(self, key: str, model: str, input_tokens: int, output_tokens: int) -> None:
        self.prompt_tokens.labels(key, model).inc(input_tokens)
        self.generation_tokens.labels(key, model).inc(output_tokens)


def refused(status: int) -> bool:
    """A request answered with a client error (bad input, a limit, a full queue), not one the
    client cut itself (499: it used what ran until then)."""
    return 400 <= status < 500 and status != CLIENT_CLOSED


def _unauthorized(message: str) -> APIError:
    return APIError(
        401,
        message,
        code="invalid_api_key",
        headers={"WWW-Authenticate": 'Bearer realm="pagoda"'},
    )
