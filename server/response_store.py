"""The responses made with `store: true`, in memory: for `previous_response_id`,
`GET /v1/responses/{id}` (and its input items) and a background response's cancel. Bounded
(the oldest go first), lost on restart and not shared between servers or replicas, as vLLM's
store is."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import islice
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pagoda.server import defaults
from pagoda.server.errors import APIError, invalid
from pagoda.server.keys.meter import Meter
from pagoda.server.response_runs import BackgroundRun


@dataclass(slots=True)
class StoredResponse:
    body: dict  # the response object, as sent (a background one's: as it is now)
    # the conversation through this response's output, without its instructions (a follow-up
    # does not inherit them), as chat messages; a follow-up's list shares these dicts
    messages: list[dict]
    owner: int | None  # the id of the API key that made it (None: no managed key)
    input_items: list[dict] = field(default_factory=list)  # its request's input, each with an id
    run: BackgroundRun | None = None  # a background response's

    def input_page(self, query: InputItemsQuery) -> dict:
        """A page of the input items, as OpenAI lists them (newest first by default)."""
        items = self.input_items if query.order == "asc" else self.input_items[::-1]
        start = _after(items, query.after, "after") + 1 if query.after else 0
        end = _after(items, query.before, "before") if query.before else len(items)
        page = items[start:end][: query.limit]
        return {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": start + len(page) < end,
        }


class InputItemsQuery(BaseModel):
    """The query of GET /v1/responses/{id}/input_items."""

    model_config = ConfigDict(extra="ignore")
    limit: int = Field(20, ge=1, le=100)
    order: Literal["asc", "desc"] = "desc"
    after: str | None = None
    before: str | None = None


class RetrieveQuery(BaseModel):
    """The query of GET /v1/responses/{id}: `stream` replays a background response's events
    (those numbered above `starting_after`), then follows them until it ends."""

    model_config = ConfigDict(extra="ignore")
    stream: bool = False
    starting_after: int = Field(-1, ge=-1)


def _after(items: list[dict], item_id: str, param: str) -> int:
    for index, item in enumerate(items):
        if item["id"] == item_id:
            return index
    raise invalid(f"{param}: no input item {item_id!r} in this response", param=param)


class ResponseStore:
    def __init__(self, capacity: int = defaults.MAX_STORED_RESPONSES) -> None:
        self.capacity = capacity
        self._responses: OrderedDict[str, StoredResponse] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def put(self, stored: StoredResponse) -> None:
        """Keep `stored`, dropping the oldest beyond the capacity; a background response still
        running is never dropped (its client could no longer read or cancel it): the oldest
        that has ended goes in its place."""
        self._responses[stored.body["id"]] = stored
        over = len(self._responses) - self.capacity
        if over > 0:
            ended = (
                response_id
                for response_id, kept in self._responses.items()
                if kept.run is None or kept.run.ended
            )
            for response_id in list(islice(ended, over)):  # the oldest first
                del self._responses[response_id]

    def get(self, response_id: str, owner: int | None, param: str | None = None) -> StoredResponse:
        """The response, or a 404: unknown, evicted, or another key's (which is not told)."""
        stored = self._responses.get(response_id)
        if stored is None or stored.owner != owner:
            raise APIError(
                404,
                f"Response with id '{response_id}' not found (responses are kept in this "
                "server's memory while store is true, the oldest dropped first).",
                param=param,
            )
        return stored

    def delete(self, response_id: str, owner: int | None) -> None:
        self.get(response_id, owner)
        del self._responses[response_id]


def owner_of(meter: Meter) -> int | None:
    """Whose responses a request may read: its managed key's (None for the others)."""
    return meter.key.id if meter.key is not None else None
