"""A key as the server holds it: its settings from the database and its live counters
(sliding one-minute windows of requests and tokens, requests in flight, spend not yet in the
database). Everything here runs on the event loop, so check-then-take is atomic."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime

from pagoda.server.errors import APIError
from pagoda.server.keys.store import as_utc, utc

WINDOW_S = 60.0
# a 429 that waiting cannot cure: the OpenAI SDK (and LangChain over it) would otherwise retry
# it twice after a backoff, for the same answer
NO_RETRY = {"x-should-retry": "false"}


@dataclass(slots=True)
class Take:
    """One admitted request's share of a window; its amount may be corrected later."""

    at: float
    amount: int
    live: bool = True  # still in its window


@dataclass(slots=True)
class Window:
    """How much was taken in the last minute, against a limit (None: unlimited)."""

    limit: int | None
    takes: deque[Take] = field(default_factory=deque)
    used: int = 0

    def expire(self, now: float) -> None:
        """Drop the takes that left the window, and the empty ones ahead of the rest (a
        refunded request, an image's tokens): the reset is when the oldest take that holds
        something leaves."""
        while self.takes and (self.takes[0].at <= now - WINDOW_S or not self.takes[0].amount):
            take = self.takes.popleft()
            take.live = False
            self.used -= take.amount

    def fits(self, amount: int) -> bool:
        return self.limit is None or self.used + amount <= self.limit

    def take(self, amount: int, now: float) -> Take:
        take = Take(now, amount)
        self.takes.append(take)
        self.used += amount
        return take

    def correct(self, take: Take, amount: int) -> None:
        """Replace an estimate by the real amount (while it is still in the window)."""
        if take.live:
            self.used += amount - take.amount
        take.amount = amount

    def remaining(self) -> int:
        return max(0, self.limit - self.used) if self.limit is not None else 0

    def wait(self, amount: int, now: float) -> float | None:
        """Seconds until `amount` more fits; None if it never can (over the limit alone)."""
        if self.limit is None or amount <= self.limit - self.used:
            return 0.0
        if amount > self.limit:
            return None
        free = self.limit - self.used
        for take in self.takes:
            free += take.amount
            if free >= amount:
                return max(take.at + WINDOW_S - now, 0.0)
        return WINDOW_S


@dataclass(slots=True)
class KeyState:
    id: int
    name: str
    models: frozenset[str] | None
    max_concurrent: int | None
    budget_usd: float | None
    budget_reset_at: str | None  # when its budget period ends, ISO 8601
    expires_at: float | None  # epoch seconds
    revoked: bool
    spent_usd: float  # in the database, as of the last refresh
    requests: Window
    tokens: Window
    in_flight: int = 0
    pending_usd: float = 0.0  # spent by requests whose ledger rows are not written yet
    held_usd: float = 0.0  # the most that the requests in flight may still cost

    @classmethod
    def from_row(cls, row: dict) -> KeyState:
        state = cls(row["id"], row["name"], None, None, None, None, None, False, 0.0,
                    Window(None), Window(None))  # fmt: skip
        state.update(row)
        return state

    def update(self, row: dict) -> None:
        """New settings from the database; the live counters stay."""
        self.name = row["name"]
        self.models = frozenset(row["models"]) if row["models"] is not None else None
        self.requests.limit = row["rpm"]
        self.tokens.limit = row["tpm"]
        self.max_concurrent = row["max_concurrent"]
        self.budget_usd = row["budget_usd"]
        reset_at = row.get("budget_reset_at")
        self.budget_reset_at = None if reset_at is None else as_utc(reset_at).isoformat()
        self.expires_at = _epoch(row["expires_at"])
        self.revoked = row["revoked_at"] is not None
        self.spent_usd = row["spent_usd"]

    def allows(self, model_id: str) -> bool:
        return self.models is None or model_id in self.models

    def admit(self, tokens: int, now: float, cost: float = 0.0) -> tuple[Take, Take]:
        """Take one request and `tokens` from the windows (their takes, in that order) and hold
        `cost`, the most the request may cost, against the budget until it ends; or raise the
        429 that says why. Held costs count: requests sent at once near the budget cannot all
        be admitted on the same spend (only one may cross it)."""
        self.requests.expire(now)
        self.tokens.expire(now)
        committed = self.spent_usd + self.pending_usd + self.held_usd
        if self.budget_usd is not None and committed >= self.budget_usd:
            again = f" It starts again at {self.budget_reset_at}." if self.budget_reset_at else ""
            raise APIError(
                429,
                f"Key '{self.name}' has used its budget of ${self.budget_usd:g}.{again}",
                code="insufficient_quota",
                error_type="insufficient_quota",
                headers=NO_RETRY,
            )
        if not self.requests.fits(1):
            wait = self.requests.wait(1, now)
            raise _rate_limited(self, "requests per min (RPM)", self.requests, 1, wait)
        if not self.tokens.fits(tokens):
            wait = self.tokens.wait(tokens, now)
            raise _rate_limited(self, "tokens per min (TPM)", self.tokens, tokens, wait)
        if self.max_concurrent is not None and self.in_flight >= self.max_concurrent:
            raise APIError(
                429,
                f"Key '{self.name}' has {self.in_flight} requests in flight, its limit of "
                f"{self.max_concurrent} concurrent requests: retry when one ends.",
                code="rate_limit_exceeded",
                error_type="requests",
                headers={"Retry-After": "1"},
            )
        self.in_flight += 1
        self.held_usd += cost
        return self.requests.take(1, now), self.tokens.take(tokens, now)

    def headers(self, now: float) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers for the limits this key has."""
        headers = {}
        for kind, window in (("requests", self.requests), ("tokens", self.tokens)):
            if window.limit is None:
                continue
            window.expire(now)
            reset = window.takes[0].at + WINDOW_S - now if window.takes else 0.0
            headers[f"x-ratelimit-limit-{kind}"] = str(window.limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(window.remaining())
            headers[f"x-ratelimit-reset-{kind}"] = duration(reset)
        return headers


def duration(seconds: float) -> str:
    """OpenAI's (Go's) way: `20ms`, `6.5s`, `1m0s`."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    if seconds < 60:
        return f"{round(seconds, 3):g}s"
    return f"{int(seconds // 60)}m{round(seconds % 60, 3):g}s"


def _rate_limited(
    key: KeyState, what: str, window: Window, asked: int, wait: float | None
) -> APIError:
    kind = "requests" if window is key.requests else "tokens"
    message = f"Rate limit reached for key '{key.name}' on {what}: Limit {window.limit}, "
    if wait is None:  # retrying cannot help
        return APIError(
            429,
            message + f"Requested {asked}. The request is larger than the limit.",
            code="rate_limit_exceeded",
            error_type=kind,
            headers=NO_RETRY,
        )
    return APIError(
        429,
        message + f"Used {window.used}, Requested {asked}. Please try again in {duration(wait)}.",
        code="rate_limit_exceeded",
        error_type=kind,
        headers={"Retry-After": str(max(1, math.ceil(wait)))},
    )


def _epoch(when: datetime | None) -> float | None:
    return utc(when).timestamp() if when is not None else None
