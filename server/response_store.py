"""The responses made with `store: true`, in memory: for `previous_response_id` and
`GET /v1/responses/{id}`. Bounded (the oldest go first), lost on restart and not shared
between servers or replicas, as vLLM's store is."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from pagoda.server import defaults
from pagoda.server.errors import APIError
from pagoda.server.keys.meter import Meter


@dataclass(slots=True)
class StoredResponse:
    body: dict  # the response object, as sent
    # the conversation through this response's output, without its instructions (a follow-up
    # does not inherit them), as chat messages; a follow-up's list shares these dicts
    messages: list[dict]
    owner: int | None  # the id of the API key that made it (None: no managed key)


class ResponseStore:
    def __init__(self, capacity: int = defaults.MAX_STORED_RESPONSES) -> None:
        self.capacity = capacity
        self._responses: OrderedDict[str, StoredResponse] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def put(self, stored: StoredResponse) -> None:
        self._responses[stored.body["id"]] = stored
        while len(self._responses) > self.capacity:
            self._responses.popitem(last=False)

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
