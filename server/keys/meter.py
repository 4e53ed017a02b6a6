"""One request's account: what the endpoints tell the gateway about a request.

An endpoint that serves a model calls, in order:
    meter = request_meter(request)
    meter.allows(model_id)        # False: answer 404 model_not_found, as for an unknown model
    meter.admit(model_id, input_tokens, output_tokens, images)
                                  # raises the 429 of a limit; the input's tokens, and the
                                  # most tokens and images the request may produce
    meter.record(input_tokens=..., output_tokens=..., images=...)   # what it used, or
    meter.track(generation)       # an object whose prompt_tokens/completion_tokens are final
                                  # when the response ends (streams cut by the client included)
The gateway bills the request when its response ends. Without a managed key (a static
--api-key, or an open server) every call is a no-op that lets the request through.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from starlette.requests import Request

from pagoda.server.keys.limits import KeyState, Take

SCOPE_KEY = "pagoda.meter"
# a model's price: (model, input tokens, output tokens, images) -> USD
Pricing = Callable[[str, int, int, int], float]


class Counted(Protocol):
    prompt_tokens: int
    completion_tokens: int


@dataclass(slots=True)
class Meter:
    key: KeyState | None  # None: no limits, no ledger
    endpoint: str
    price: Pricing | None = None  # with a key: what its requests cost
    started: float = field(default_factory=time.monotonic)
    model: str | None = None
    take: Take | None = None  # the tokens held in the key's window since admission
    request_take: Take | None = None  # the request's place in the key's requests window
    refused: bool = False  # answered 4xx after admission: taken back out of the windows
    input_tokens: int = 0
    output_tokens: int = 0
    images: int = 0
    tracked: list[Counted] = field(default_factory=list)
    holds_slot: bool = False  # counted in the key's requests in flight
    held_usd: float = 0.0  # held against the key's budget while the request runs
    # a background response's: its answer ends before its run, which releases the slot
    detached: bool = False

    @property
    def admitted(self) -> bool:
        return self.take is not None

    @property
    def limits_tokens(self) -> bool:
        """Whether a key's tpm needs the request's tokens before admitting it."""
        return self.key is not None and self.key.tokens.limit is not None

    def allows(self, model_id: str) -> bool:
        return self.key is None or self.key.allows(model_id)

    def admit(
        self, model_id: str, input_tokens: int = 0, output_tokens: int = 0, images: int = 0
    ) -> None:
        """Admit the request against the key's limits: its input tokens, and the most tokens
        and images it may produce (the tpm counts both kinds of tokens)."""
        self.model = model_id
        if self.key is not None and self.take is None:
            most = self.price(model_id, input_tokens, output_tokens, images) if self.price else 0
            tokens = input_tokens + output_tokens
            self.request_take, self.take = self.key.admit(tokens, time.monotonic(), most)
            self.held_usd = most
            self.holds_slot = True

    def refuse(self) -> None:
        """Take an admitted request that was then refused back out of the key's windows: a
        refused request does not count against rpm or tpm (docs/keys.md)."""
        if self.admitted and not self.refused:
            self.refused = True
            self.key.requests.correct(self.request_take, 0)
            self.key.tokens.correct(self.take, 0)

    def release(self) -> None:
        """Leave the key's requests in flight, and shrink what the request holds of the tpm
        window and of the budget to what it used (once), as soon as its answer is complete (a
        stream's `[DONE]`, a body's last bytes): a client that reads the end of one answer and
        sends its next request at once must find neither the slot nor the most the request
        could have used still taken. A refused request uses nothing: refuse() took it back."""
        if not self.holds_slot:
            return
        self.holds_slot = False
        self.key.in_flight -= 1
        cost = 0.0
        if not self.refused:
            input_tokens, output_tokens, images = self.totals()
            self.key.tokens.correct(self.take, input_tokens + output_tokens)
            if self.price is not None:
                cost = self.price(self.model, input_tokens, output_tokens, images)
        self.key.held_usd += cost - self.held_usd
        self.held_usd = cost

    def record(self, input_tokens: int = 0, output_tokens: int = 0, images: int = 0) -> None:
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens
        self.images += images

    def track(self, counted: Counted) -> None:
        self.tracked.append(counted)

    def totals(self) -> tuple[int, int, int]:
        """(input tokens, output tokens, images) so far."""
        return (
            self.input_tokens + sum(c.prompt_tokens for c in self.tracked),
            self.output_tokens + sum(c.completion_tokens for c in self.tracked),
            self.images,
        )


def request_meter(request: Request) -> Meter:
    meter = request.scope.get(SCOPE_KEY)
    if meter is None:
        meter = request.scope[SCOPE_KEY] = Meter(None, request.url.path)
    return meter
