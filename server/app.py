"""The Starlette application: routes, bearer auth, body limits and the OpenAI error shape."""

from __future__ import annotations

import contextlib
import hmac
import logging
from typing import Any, Protocol

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from pagoda.server.chat import chat_completion, chat_prompt
from pagoda.server.completions import completion
from pagoda.server.embeddings import EmbeddingRequest, create_embeddings
from pagoda.server.errors import APIError, invalid
from pagoda.server.image_request import ImageGenerationRequest
from pagoda.server.image_store import URL_PATH, ImageStore
from pagoda.server.images import generate_images, image_file
from pagoda.server.metrics import HTTPResponseCounter, Metrics
from pagoda.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    parse_body,
)
from pagoda.server.tokenizer_info import tokenizer_info
from pagoda.server.worker_client import RequestRejected, WorkerDeadError

logger = logging.getLogger(__name__)
DEFAULT_MAX_BODY_BYTES = 16 << 20
PROTECTED = ("/v1", "/tokenize", "/detokenize", "/tokenizer_info")
# image URLs are unguessable and expire: open to whoever holds one, as OpenAI's signed URLs are
PUBLIC = (URL_PATH,)
# what each kind of catalog entry serves, for the error that sends a client to the right one
ENDPOINTS = {
    "chat": "/v1/chat/completions and /v1/completions",
    "embedding": "/v1/embeddings",
    "image": "/v1/images/generations",
}


class Served(Protocol):
    """A served model of any kind (chat: generation.ServedModel) and its worker process."""

    id: str
    kind: str
    client: Any  # a WorkerClient
    created: int
    owned_by: str
    max_model_len: int


class BearerAuth:
    """RFC 6750 bearer keys on /v1/* and the tokenizer routes; /health and /metrics stay open."""

    def __init__(self, app: ASGIApp, keys: list[str]) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        protected = path.startswith(PROTECTED) and not path.startswith(PUBLIC)
        if scope["type"] == "http" and self.keys and protected:
            headers = dict(scope["headers"])
            if not self._authorized(headers.get(b"authorization", b"")):
                error = APIError(
                    401,
                    "Incorrect API key provided. Pass it as 'Authorization: Bearer <key>'.",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": 'Bearer realm="pagoda"'},
                )
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _authorized(self, header: bytes) -> bool:
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        # every key is compared, in constant time, so timing tells nothing about them
        matches = [hmac.compare_digest(token.strip(), key) for key in self.keys]
        return any(matches)


def build_app(
    models: dict[str, Served],
    metrics: Metrics,
    *,
    api_keys: list[str] = (),
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_concurrent_requests: int | None = None,
    on_shutdown=None,
    image_store: ImageStore | None = None,
    public_url: str | None = None,
) -> Starlette:
    async def read_body(request: Request) -> bytes:
        content_type = request.headers.get("content-type", "")
        if content_type.split(";")[0].strip().lower() != "application/json":
            raise invalid(f"Content-Type must be application/json, got {content_type!r}")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            raise _too_large(max_body_bytes)
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > max_body_bytes:
                raise _too_large(max_body_bytes)
        return bytes(body)

    def served(model_id: str, kind: str = "chat") -> Any:
        model = models.get(model_id)
        if model is None:
            raise APIError(
                404,
                f"The model '{model_id}' does not exist or is not served here.",
                param="model",
                code="model_not_found",
            )
        if model.kind != kind:
            raise invalid(
                f"'{model_id}' is {'an' if model.kind[0] in 'aeiou' else 'a'} {model.kind} model: "
                f"it serves {ENDPOINTS[model.kind]}, not {ENDPOINTS[kind]}.",
                param="model",
            )
        if not model.client.healthy:
            raise APIError(503, f"The engine serving '{model_id}' is not running.")
        limit = max_concurrent_requests
        if limit is not None and model.client.num_in_flight >= limit:
            raise APIError(
                429,
                f"'{model_id}' is serving its limit of {limit} concurrent requests: retry later.",
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            )
        return model

    async def chat(request: Request) -> Response:
        req = parse_body(ChatCompletionRequest, await read_body(request))
        return await chat_completion(served(req.model), req, metrics)

    async def completions(request: Request) -> Response:
        req = parse_body(CompletionRequest, await read_body(request))
        return await completion(served(req.model), req, metrics)

    def first_model(kind: str = "chat") -> str:
        """The model a request without `model` gets (vLLM serves one; here the first)."""
        return next((m.id for m in models.values() if m.kind == kind), "")

    async def images(request: Request) -> Response:
        req = parse_body(ImageGenerationRequest, await read_body(request))
        model = served(req.model or first_model("image"), kind="image")
        return await generate_images(model, req, request, metrics.images, store, public_url)

    async def image_files(request: Request) -> Response:
        return await image_file(request, store)

    async def embeddings(request: Request) -> Response:
        req = parse_body(EmbeddingRequest, await read_body(request))
        model = served(req.model, "embedding")
        return await create_embeddings(model, req, request, metrics.embeddings)

    async def tokenize(request: Request) -> Response:
        req = parse_body(TokenizeRequest, await read_body(request))
        model = served(req.model or first_model())
        if req.messages is not None:
            ids = chat_prompt(model, req, req.add_generation_prompt)
        else:
            ids = model.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        return JSONResponse(
            {"count": len(ids), "max_model_len": model.max_model_len, "tokens": ids}
        )

    async def detokenize(request: Request) -> Response:
        req = parse_body(DetokenizeRequest, await read_body(request))
        model = served(req.model or first_model())
        model.check_prompt(req.tokens, param="tokens")
        return JSONResponse({"prompt": model.tokenizer.decode(req.tokens)})

    async def list_models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [_model_card(m) for m in models.values()]})

    async def get_model(request: Request) -> Response:
        model_id = request.path_params["model_id"]
        if model_id not in models:
            raise _unknown_model(model_id)
        return JSONResponse(_model_card(models[model_id]))

    async def get_tokenizer_info(request: Request) -> Response:
        model = served(request.query_params.get("model") or first_model())
        return JSONResponse(tokenizer_info(model.tokenizer, model.max_model_len))

    async def health(request: Request) -> Response:
        sick = [m.id for m in models.values() if not m.client.healthy]
        if sick:
            return JSONResponse({"status": "unhealthy", "engines_down": sick}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics_endpoint(request: Request) -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    store = image_store
    if store is None and any(model.kind == "image" for model in models.values()):
        store = ImageStore()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        yield
        if on_shutdown is not None:
            await on_shutdown()

    app = Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/images/generations", images, methods=["POST"]),
            Route(URL_PATH + "{name}", image_files, methods=["GET"]),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/tokenize", tokenize, methods=["POST"]),
            Route("/detokenize", detokenize, methods=["POST"]),
            Route("/tokenizer_info", get_tokenizer_info, methods=["GET"]),
        ],
        exception_handlers={
            APIError: lambda request, exc: exc.response(),
            HTTPException: _http_error,
            WorkerDeadError: lambda request, exc: APIError(503, str(exc)).response(),
            ValueError: lambda request, exc: invalid(str(exc)).response(),
            RequestRejected: lambda request, exc: invalid(str(exc), exc.param, exc.code).response(),
            Exception: _server_error,
        },
        lifespan=lifespan,
    )
    app.add_middleware(BearerAuth, keys=list(api_keys))
    # outermost, so that auth rejections and handled errors are counted too
    app.add_middleware(HTTPResponseCounter, counter=metrics.http_responses, routes=app.routes)
    return app


def _too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than the limit of {limit} bytes.")


def _unknown_model(model_id: str) -> APIError:
    return APIError(
        404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found"
    )


def _model_card(model: Served) -> dict:
    return {
        "id": model.id,
        "object": "model",
        "created": model.created,
        "owned_by": model.owned_by,
        "max_model_len": model.max_model_len,
    }


async def _http_error(request: Request, exc: HTTPException) -> Response:
    message = {404: f"Unknown route {request.url.path}", 405: "Method not allowed"}.get(
        exc.status_code, str(exc.detail)
    )
    return APIError(exc.status_code, message).response()


async def _server_error(request: Request, exc: Exception) -> Response:
    logger.exception("unexpected error on %s", request.url.path)
    return APIError(500, "The server had an error while processing your request.").response()
