"""Every response carries an `x-request-id` header, as OpenAI's do (the SDK shows it as
`response._request_id`, for a support request): the client's own `X-Request-Id` when it sent a
usable one (a gateway's, to follow one request through its logs and ours), else a new one. An
unexpected error's log line names it."""

from __future__ import annotations

import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

SCOPE_KEY = "pagoda.request_id"
HEADER = b"x-request-id"
_USABLE = re.compile(rb"[\x21-\x7e]{1,128}")  # visible ASCII: safe in a header and a log line


class RequestIds:
    """ASGI middleware, outermost: every response, the errors of the layers below included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(HEADER, b"")
        request_id = given if _USABLE.fullmatch(given) else f"req_{uuid.uuid4().hex}".encode()
        scope[SCOPE_KEY] = request_id.decode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k != HEADER]
                message["headers"] = [*headers, (HEADER, request_id)]
            await send(message)

        await self.app(scope, receive, send_with_id)
