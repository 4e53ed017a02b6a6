"""`--max-concurrent-requests`: each model's requests, from the moment one names its model to
the end of its response."""

from __future__ import annotations

from collections import Counter

from starlette.types import ASGIApp, Receive, Scope, Send

from pagoda.server.errors import APIError

SCOPE_KEY = "pagoda.model_slot"


class ModelSlots:
    """Counted by the server, not read from the engine: a burst must meet the limit before its
    prompts are tokenized, while the engine knows nothing of them yet, and a stream holds its
    slot until its last event is sent."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.held: Counter[str] = Counter()

    def take(self, scope: Scope, model_id: str) -> None:
        if self.limit is None or SCOPE_KEY in scope:
            return
        if self.held[model_id] >= self.limit:
            raise APIError(
                429,
                f"'{model_id}' is serving its limit of {self.limit} concurrent requests: "
                "retry later.",
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            )
        self.held[model_id] += 1
        scope[SCOPE_KEY] = model_id

    def give_back(self, scope: Scope) -> None:
        model_id = scope.pop(SCOPE_KEY, None)
        if model_id is not None:
            self.held[model_id] -= 1


class GiveBackSlots:
    """ASGI middleware: a request's slot is given back once its response has been sent (or
    has failed, or its client left)."""

    def __init__(self, app: ASGIApp, slots: ModelSlots) -> None:
        self.app = app
        self.slots = slots

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        finally:
            self.slots.give_back(scope)
