"""Per-model admission: a model whose queue is full answers 429 with Retry-After at once, so
that no queue grows without bound (chat: --max-waiting-requests, embeddings and images: their
catalog settings)."""

from __future__ import annotations

import math

from pagoda.server.errors import APIError

DEFAULT_MAX_WAITING_REQUESTS = 512


def queue_full(model_id: str, what: str, retry_after_s: float = 1.0) -> APIError:
    """The 429 of a model whose queue is full; `what`: e.g. "4 images queued (limit 4)"."""
    return APIError(
        429,
        f"'{model_id}' has {what}: retry later.",
        code="rate_limit_exceeded",
        headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))},
    )
