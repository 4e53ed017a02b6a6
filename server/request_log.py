"""`--log-requests`: each request body, as parsed, in the log. Off by default: prompts are the
users' data, and the server logs none of them (nor keys, which only the auth layer reads)."""

from __future__ import annotations

import logging

from pydantic import BaseModel

logger = logging.getLogger(__name__)
MAX_LOGGED_CHARS = 4096  # a 16 MB body would otherwise be one 16 MB line

_enabled = False


def set_log_requests(enabled: bool) -> None:
    global _enabled
    _enabled = enabled


def log_request(request: BaseModel) -> None:
    if _enabled:
        text = request.model_dump_json(exclude_defaults=True)
        cut = f"... ({len(text)} chars)" if len(text) > MAX_LOGGED_CHARS else ""
        logger.info("%s: %s%s", type(request).__name__, text[:MAX_LOGGED_CHARS], cut)
