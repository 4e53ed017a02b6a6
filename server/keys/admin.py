"""/admin/*: the `pagoda keys` and `pagoda usage` operations over HTTP, for the admin key.

GET    /admin/keys                      the keys (no secrets)
POST   /admin/keys                      {"name", "models", "rpm", "tpm", "max_concurrent",
                                         "budget", "expires"} -> 201, the key once in "key"
PATCH  /admin/keys/{name}               {"rpm": 20, "budget": null, ...}: set or clear limits
DELETE /admin/keys/{name}               revoke
GET    /admin/usage?key=NAME&since=DATE per key and model
"""

from __future__ import annotations

import asyncio
import hmac

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pagoda.server.errors import APIError, invalid
from pagoda.server.keys import store
from pagoda.server.keys.gateway import Gateway
from pagoda.server.protocol import parse_body


def admin_routes(gateway: Gateway) -> list[Route]:
    def check(request: Request) -> None:
        if gateway.engine is None or gateway.admin_key is None:
            raise APIError(404, "The admin API is off: start the server with --admin-key.")
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        if not hmac.compare_digest(given, gateway.admin_key.encode()):
            raise APIError(
                401,
                "This route needs the admin key: 'Authorization: Bearer <admin key>'.",
                code="invalid_api_key",
                headers={"WWW-Authenticate": 'Bearer realm="pagoda-admin"'},
            )

    async def call(request: Request, operation, *args):
        """Run `operation` on the database in a thread, then let the server see the change at
        once."""
        check(request)
        try:
            result = await asyncio.to_thread(operation, gateway.engine, *args)
        except store.StoreError as exc:
            raise APIError(exc.status, str(exc)) from None
        except Exception as exc:  # the database is down: nothing was written
            raise APIError(503, f"The key database is unavailable: {type(exc).__name__}") from exc
        await gateway.sync()
        return result

    async def list_keys(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": await call(request, store.list_keys)})

    async def create_key(request: Request) -> Response:
        check(request)
        spec = parse_body(store.KeySpec, await request.body())
        row, secret = await call(request, store.create_key, spec)
        return JSONResponse({**row, "key": secret}, status_code=201)

    async def update_key(request: Request) -> Response:
        check(request)
        change = parse_body(store.KeyUpdate, await request.body())
        name = request.path_params["name"]
        return JSONResponse(await call(request, store.update_key, name, change))

    async def revoke_key(request: Request) -> Response:
        name = request.path_params["name"]
        return JSONResponse(await call(request, store.revoke_key, name))

    async def usage(request: Request) -> Response:
        check(request)  # before its parameters: without the key, nothing else is said
        since = request.query_params.get("since")
        try:
            since = store.parse_when(since) if since else None
        except ValueError as exc:
            raise invalid(str(exc), param="since") from None
        rows = await call(request, store.usage_report, request.query_params.get("key"), since)
        return JSONResponse({"object": "list", "data": rows})

    async def keys(request: Request) -> Response:
        # one route for both methods, so that a 405 on /admin/keys lists both in Allow
        return await (create_key if request.method == "POST" else list_keys)(request)

    async def key(request: Request) -> Response:
        return await (update_key if request.method == "PATCH" else revoke_key)(request)

    return [
        Route("/admin/keys", keys, methods=["GET", "POST"]),
        Route("/admin/keys/{name}", key, methods=["PATCH", "DELETE"]),
        Route("/admin/usage", usage, methods=["GET"]),
    ]
